"""Ranks that agree before they train: each compares what it was launched with, at the rendezvous.

Nothing in training would notice two ranks launched with different settings:
another learning rate, ``k``, set of widths or hook trains a diverged copy
that rank 0 saves as if it were the run; another ``d_sae`` or batch size
fails in the first collective as if a rank had died; another activation
selects with other collectives and hangs. So each rank posts what it was
launched with (``WORLD_SIZE``, ``latent_shards`` and the whole runner config,
:func:`run_settings`) in its arrival record at the rendezvous
(:class:`Board`), and compares it with the others' as they arrive. A
difference is a ``ValueError`` on every rank, listing each differing field
with its value per rank, within the rendezvous timeout and before any
collective: a ``WORLD_SIZE`` that differs is seen in the records of the
ranks that came, without waiting for one that never will. Fields that
legitimately differ per rank are listed in :data:`PER_RANK_FIELDS`. When the
process group already exists (a second run in one process),
:func:`agree_in_group` compares the same records over ``all_gather_object``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.distributed as dist
from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_matryoshka.distributed.mesh import CollectiveError, collective

#: the environment variable of the rendezvous timeout (read by ``launch``)
RENDEZVOUS_TIMEOUT_ENV = "SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT"
#: each rank's record holds its ``WORLD_SIZE`` under this name, beside :func:`run_settings`
WORLD_SIZE_FIELD = "WORLD_SIZE"


def launch_record(n_ranks: int, settings: Mapping[str, str]) -> dict[str, str]:
    """What a rank posts: its ``WORLD_SIZE`` and :func:`run_settings`."""
    return {WORLD_SIZE_FIELD: _json(n_ranks), **settings}


def _device_kind(device: Any) -> Any:
    """``"cuda"`` for ``"cuda:3"``: the kind of device, without this rank's own index."""
    return None if device is None else str(device).partition(":")[0]


def _without_run_id(path: Any) -> Any:
    """The folder SAELens was given for checkpoints, without the run id it appended."""
    return None if path is None else str(path).rpartition("/")[0]


#: Fields of the runner config (paths into ``cfg.to_dict()``) that the ranks of one run may
#: hold differently, each with the part that must still agree (``None``: not compared at
#: all). Every other field, and ``WORLD_SIZE`` and ``latent_shards``, must be the same on
#: every rank.
PER_RANK_FIELDS: dict[str, Callable[[Any], Any] | None] = {
    # each rank has its own GPU: from Python a run gives cuda:LOCAL_RANK (the CLI's "cuda" is
    # made this rank's GPU by torch.cuda.set_device); the kind (cpu or cuda) must agree
    "device": _device_kind,
    "llm_device": _device_kind,
    "act_store_device": _device_kind,
    "sae.device": _device_kind,
    # SAELens appends to the folder given a run id drawn in each process (or the wandb id);
    # data-parallel, rank 0 alone writes checkpoints, and latent-sharded, every rank takes
    # rank 0's folder (_agree_on_checkpoint_path). The folder itself must agree
    "checkpoint_path": _without_run_id,
    # rank 0 alone logs to wandb (rank_config), so another rank's run id is never used, and
    # a script may draw a fresh one in each process
    "logger.wandb_id": None,
    # a copy of fields compared as they are (the SAE's own fields, sae_lens_version):
    # comparing it too would list each difference twice
    "sae.metadata": None,
}

#: how a field one rank has and another has not is shown
NOT_SET = "(not set)"


def run_settings(cfg: LanguageModelSAERunnerConfig[Any], latent_shards: int = 1) -> dict[str, str]:
    """What this rank was launched with, to compare with every other rank: ``{field: JSON text}``.

    ``latent_shards`` and every field of ``cfg.to_dict()``, the SAE's and the
    logger's as ``sae.<field>`` and ``logger.<field>``, except what
    :data:`PER_RANK_FIELDS` leaves out or compares in part. Values are
    compared as JSON text, so that a NaN equals a NaN and a float is compared
    to the last bit.
    """
    settings = {"latent_shards": _json(latent_shards)}
    _flatten(cfg.to_dict(), "", settings)
    return settings


def _flatten(fields: Mapping[str, Any], prefix: str, into: dict[str, str]) -> None:
    for name, value in fields.items():
        path = f"{prefix}{name}"
        if path in PER_RANK_FIELDS:
            compared = PER_RANK_FIELDS[path]
            if compared is None:
                continue
            value = compared(value)
        if isinstance(value, Mapping) and value:
            _flatten(value, f"{path}.", into)
        else:
            into[path] = _json(value)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_plain)


def _plain(value: Any) -> str:
    """A value JSON cannot write, as its repr without a memory address (differs per process)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _disagreement(
    this_rank: int, n_ranks: int, records: Mapping[int, Mapping[str, str]]
) -> ValueError | None:
    """The error naming each field whose value is not the same in every rank's record, if any.

    A ``ValueError``, not a :class:`CollectiveError`: no rank died or stalled,
    the launch was wrong, and the CLI reports a ``ValueError`` from building
    the run as one line.
    """
    fields = dict.fromkeys(field for record in records.values() for field in record)
    lines = []
    for field in fields:
        values = {r: records[r].get(field) for r in sorted(records)}
        if len(set(values.values())) > 1:
            lines.append(f"  {field}: {_per_rank(values)};")  # (";": still clear on one line)
    if not lines:
        return None
    return ValueError(
        f"rank {this_rank} of {n_ranks}: the ranks were launched with different settings "
        f"({_ranks(sorted(records))} compared):\n"
        + "\n".join(lines)
        + "\nLaunch every rank with the same settings: the same command or config, and the "
        "same WORLD_SIZE (under torchrun, ranks differ only in RANK, LOCAL_RANK and their GPU)."
    )


def _per_rank(values: Mapping[int, str | None]) -> str:
    """``rank 0 0.0003, rank 1 0.001``; ranks with the same value together."""
    groups: dict[str | None, list[int]] = {}
    for r, value in values.items():
        groups.setdefault(value, []).append(r)
    return ", ".join(
        f"{_ranks(ranks)} {NOT_SET if value is None else value}" for value, ranks in groups.items()
    )


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 0 and 1``, ``ranks 0-6 and 8``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    spans: list[list[int]] = []
    for r in ranks:
        if spans and spans[-1][-1] == r - 1:
            spans[-1].append(r)
        else:
            spans.append([r])
    parts = [
        f"{span[0]}-{span[-1]}" if len(span) > 2 else " and ".join(map(str, span)) for span in spans
    ]
    return "ranks " + " and ".join(parts)


def agree_in_group(settings: Mapping[str, str]) -> None:
    """Compare ``settings`` over a process group that already exists (a second run, say)."""
    n_ranks = dist.get_world_size()
    record = launch_record(n_ranks, settings)
    records: list[Any] = [None] * n_ranks
    what = "comparing the ranks' settings"
    collective(what, lambda: dist.all_gather_object(records, record))
    error = _disagreement(dist.get_rank(), n_ranks, dict(enumerate(records)))
    if error is not None:
        raise error


#: how often a rank at the rendezvous reads the board, in seconds
POLL_S = 0.05
#: how long rank 0, failing, keeps the board (its store) up for the ranks that came to read
#: why; they read it within POLL_S
FAREWELL_S = 10.0


class Board:
    """The rendezvous's keys in the store: each rank's record, the first failure, who left.

    A rank posts its record (``arrived/<rank>``: its ``WORLD_SIZE`` and
    settings) and compares it with rank 0's as soon as both are there; rank 0
    compares every rank's as each comes. So a difference is found without
    waiting for the rest (one that a ``WORLD_SIZE`` promises may never come),
    and each record is read once by rank 0 and once more by its own rank, not
    by every rank (all agree with rank 0 exactly when all agree). A rank that
    fails posts why (``failure``: the records that show it, or whom it
    missed); the others, reading it, raise the same error from those records.
    Rank 0, when it hosts the store, waits before raising until the ranks it
    heard from have left (``left/<rank>``): its exit takes the board with it.
    """

    def __init__(
        self, store: dist.Store, this_rank: int, n_ranks: int, where: str, hosting: bool
    ) -> None:
        self.store = store
        self.this_rank = this_rank
        self.n_ranks = n_ranks
        self.where = where
        self.hosting = hosting
        #: the ranks seen at the board, and the records read (this rank's and rank 0's; all
        #: on rank 0)
        self.arrived: set[int] = set()
        self.records: dict[int, dict[str, str]] = {}

    def meet(self, settings: Mapping[str, str], timeout_s: float) -> None:
        """Post this rank's record, wait for every rank; raise if one differs or does not come."""
        record = launch_record(self.n_ranks, settings)
        self.arrived = {self.this_rank}
        self.records = {self.this_rank: record}
        try:
            with self._lost_board():
                self.store.set(f"arrived/{self.this_rank}", json.dumps(record))
                self._wait(timeout_s)
        except (ValueError, CollectiveError):  # posted on the board (not so a Ctrl-C)
            if self.hosting:
                self._farewell()
            raise
        finally:
            with contextlib.suppress(RuntimeError, dist.DistError):
                self.store.set(f"left/{self.this_rank}", "")

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._raise_posted_failure()
            for r in range(self.n_ranks):
                if r not in self.arrived and self.store.check([f"arrived/{r}"]):
                    self.arrived.add(r)
                    if 0 in (r, self.this_rank):
                        self.records[r] = self._record(r)
            missing = [r for r in range(self.n_ranks) if r not in self.arrived]
            own = self.records[self.this_rank]
            error: Exception | None = None
            if any(other != own for other in self.records.values()):  # (the cheap test first)
                error = _disagreement(self.this_rank, self.n_ranks, self.records)
            if error is None and missing and time.monotonic() > deadline:
                error = self._missing_error(self.this_rank, missing, timeout_s)
            if error is not None:
                reference = self.records.get(0)
                shown = [  # rank 0, this rank, and those that differ from rank 0
                    r
                    for r, other in sorted(self.records.items())
                    if r in (0, self.this_rank) or other != reference
                ]
                failure = {"rank": self.this_rank, "compared": shown, "missing": missing}
                self.store.set("failure", json.dumps(failure | {"timeout_s": timeout_s}))
                raise error
            if not missing:
                return
            time.sleep(POLL_S)

    def _raise_posted_failure(self) -> None:
        """Raise what another rank failed with, found again from the records it compared."""
        if not self.store.check(["failure"]):
            return
        failure = json.loads(self.store.get("failure"))
        for r in failure["compared"]:
            if r not in self.records:
                self.records[r] = self._record(r)
        compared = {r: self.records[r] for r in {*failure["compared"], self.this_rank}}
        error = _disagreement(self.this_rank, self.n_ranks, compared)
        if error is not None:
            raise error
        raise self._missing_error(failure["rank"], failure["missing"], failure["timeout_s"])

    def _missing_error(self, waiting: int, missing: list[int], timeout_s: float) -> CollectiveError:
        by = "" if waiting == self.this_rank else f" (rank {waiting} waited for them)"
        return CollectiveError(
            f"rank {self.this_rank} of {self.n_ranks}: ranks {missing} did not join within "
            f"{timeout_s:g} s ({RENDEZVOUS_TIMEOUT_ENV}){by}; they failed to start, or were "
            "not launched."
        )

    def _record(self, r: int) -> dict[str, str]:
        record: dict[str, str] = json.loads(self.store.get(f"arrived/{r}"))
        return record

    def _farewell(self) -> None:
        """Keep the store up until the ranks heard from have read why this rank fails."""
        others = sorted(self.arrived - {self.this_rank})
        deadline = time.monotonic() + FAREWELL_S
        with contextlib.suppress(RuntimeError, dist.DistError):
            while others and time.monotonic() < deadline:
                others = [r for r in others if not self.store.check([f"left/{r}"])]
                time.sleep(POLL_S)

    @contextlib.contextmanager
    def _lost_board(self) -> Iterator[None]:
        """The store failing under a rank (rank 0, its host, gone) as a :class:`CollectiveError`."""
        try:
            yield
        except CollectiveError:
            raise
        except (RuntimeError, dist.DistError) as error:
            raise CollectiveError(
                f"rank {self.this_rank} of {self.n_ranks} lost the rendezvous at {self.where} "
                f"while waiting for the other ranks: rank 0, which holds it, has probably "
                f"stopped (see its error). Cause: {error}"
            ) from error
