"""A kernel with several implementations, the fastest chosen by timing them where it runs.

The fastest way to compute a sparse product depends on the machine: on one
CPU a CSR product is the faster, on another an ``embedding_bag`` over sorted
entries is several times faster, and a GPU differs again. A
:class:`MeasuredKernel` times each candidate a few times on the first call
for a shape (as ``torch.backends.cudnn.benchmark`` does; in interleaved
rounds, so that a burst of load on a shared machine slows them all), keeps
the fastest for the rest of the run and logs the choice once. Timing synchronises the
device, but only on those first calls: a steady step reads nothing back for it.

The candidates compute the same sum in different orders, so they agree only
up to float rounding (the tests hold them equal to a tolerance), and a choice
that flipped between two runs would make them train different weights: on a
busy machine two close candidates swap places from one timing to the next.
So a measured choice is kept on disk (:func:`cache_folder`, one small JSON
file per kernel, shape and machine) and every later run on the same machine
reads it instead of timing again: the same command gives the same weights,
at the speed measured the first time. Two processes measuring at once (the
ranks of a ``torchrun``) agree on whichever recorded its choice first.

``SAE_MATRYOSHKA_KERNELS="name=candidate,..."`` fixes a kernel's choice (no
timing, no cache), to reproduce a run on another machine (:func:`choices`
says what a run used) and for tests. ``SAE_MATRYOSHKA_KERNEL_CACHE`` moves
the cache; set to an empty string it keeps none (every process measures).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
import time
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

#: ``"kernel=candidate,..."``: fixed choices, no timing
CHOICE_ENV = "SAE_MATRYOSHKA_KERNELS"
#: the folder measured choices are kept in; an empty string keeps none
CACHE_ENV = "SAE_MATRYOSHKA_KERNEL_CACHE"
#: timed calls per candidate in a round (after one untimed call, which warms caches and allocators)
_TIMED_CALLS = 2
#: rounds over the candidates, interleaved: a burst of load from another process
#: on a shared machine then slows every candidate's calls alike, not one's
_ROUNDS = 2

_LOG = logging.getLogger(__name__)
Result = TypeVar("Result")

#: every kernel alive, for :func:`choices`
_KERNELS: weakref.WeakSet[MeasuredKernel[Any]] = weakref.WeakSet()


class MeasuredKernel(Generic[Result]):
    """A kernel ``name`` whose ``candidates`` compute the same; the fastest per key runs."""

    def __init__(self, name: str, candidates: dict[str, Callable[..., Result]]) -> None:
        self.name = name
        self.candidates = candidates
        #: the chosen candidate per key (shape, dtype, device), for the rest of the run
        self.chosen: dict[Hashable, str] = {}
        _KERNELS.add(self)

    def __call__(self, key: Hashable, *args: object) -> Result:
        """The result of the chosen candidate for ``key`` on ``args``."""
        name = self.chosen.get(key) or self.fixed() or self._cached_or_measured(key, args)
        return self.candidates[name](*args)

    def fixed(self) -> str | None:
        """The candidate ``SAE_MATRYOSHKA_KERNELS`` names for this kernel, if any."""
        for item in os.environ.get(CHOICE_ENV, "").split(","):
            kernel, _, candidate = item.partition("=")
            if kernel.strip() != self.name:
                continue
            if candidate.strip() not in self.candidates:
                raise ValueError(
                    f"{CHOICE_ENV}: kernel {self.name!r} has the candidates "
                    f"{sorted(self.candidates)}, got {candidate.strip()!r}."
                )
            return candidate.strip()
        return None

    def _cached_or_measured(self, key: Hashable, args: tuple[object, ...]) -> str:
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        entry = self._cache_entry(key, device)
        chosen = self._read(entry) if entry is not None else None
        if chosen is not None:
            _LOG.info("%s for %s: %s (measured before, kept in %s)", self.name, key, chosen, entry)
        else:
            times = dict.fromkeys(self.candidates, math.inf)
            for _ in range(_ROUNDS):
                for name, candidate in self.candidates.items():
                    times[name] = min(times[name], _time(candidate, args, device))
            chosen = min(times, key=times.__getitem__)
            _LOG.info(
                "%s for %s: %s (measured %s)",
                self.name,
                key,
                chosen,
                ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in times.items()),
            )
            if entry is not None:
                chosen = self._record(entry, key, device, chosen, times)
        self.chosen[key] = chosen
        return chosen

    def _cache_entry(self, key: Hashable, device: torch.device) -> Path | None:
        """The file that keeps this kernel's choice for ``key`` on this machine, if caching."""
        folder = cache_folder()
        if folder is None:
            return None
        identity = json.dumps(
            [self.name, sorted(self.candidates), _describe(key), machine(device), package_version()]
        )
        return folder / f"{self.name}-{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"

    def _read(self, entry: Path) -> str | None:
        """The choice ``entry`` keeps, or None (absent, unreadable, or not a candidate now)."""
        try:
            choice = json.loads(entry.read_text()).get("choice")
        except (OSError, ValueError, AttributeError):
            return None
        return choice if choice in self.candidates else None

    def _record(
        self,
        entry: Path,
        key: Hashable,
        device: torch.device,
        chosen: str,
        times: dict[str, float],
    ) -> str:
        """Keep ``chosen`` in ``entry``; what another process kept there first wins.

        The entry is written whole to a temporary file, then linked into
        place, which fails if the entry exists: a reader never sees half of
        one, and of two processes measuring at once both use the first's choice.
        """
        content = {
            "kernel": self.name,
            "key": _describe(key),
            "machine": machine(device),
            "choice": chosen,
            "measured_ms": {name: seconds * 1e3 for name, seconds in times.items()},
        }
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=entry.parent, prefix=".tmp-", suffix=".json", delete=False
            ) as file:
                json.dump(content, file, indent=1)
            written = Path(file.name)
            try:
                os.link(written, entry)
            except FileExistsError:
                kept = self._read(entry)
                if kept is not None:
                    return kept
                os.replace(written, entry)  # a damaged or stale entry: ours replaces it
            except OSError:  # a filesystem without hard links: the last writer wins
                os.replace(written, entry)
            finally:
                with contextlib.suppress(OSError):
                    written.unlink()
        except OSError as error:
            _LOG.warning(
                "%s: could not keep the choice in %s (%s); a later run measures again and may "
                "choose otherwise (set %s to a writable folder, or fix the choice with %s)",
                self.name,
                entry,
                error,
                CACHE_ENV,
                CHOICE_ENV,
            )
        return chosen


def cache_folder() -> Path | None:
    """Where measured choices are kept: ``SAE_MATRYOSHKA_KERNEL_CACHE``, else the user's cache.

    ``$XDG_CACHE_HOME/sae_lens_matryoshka/kernels`` (``~/.cache/...`` by
    default). None when ``SAE_MATRYOSHKA_KERNEL_CACHE`` is set empty.
    """
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae_lens_matryoshka" / "kernels"


def machine(device: torch.device) -> str:
    """What a timing on ``device`` depends on: the processor or GPU, the threads, torch.

    No host name: identical machines (the nodes of a cluster sharing a home
    folder) share their choices, and so train alike.
    """
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        name = f"{device.type} {cpu_model()}, {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def package_version() -> str:
    """This package's version: part of a kept choice's identity, as a release may change a
    kernel's candidates and with them which is faster ("not installed" run from a source tree)."""
    try:
        return importlib.metadata.version("sae-lens-matryoshka")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` shows it (``platform.processor()`` is empty on most Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _describe(key: Hashable) -> str:
    """``key`` as text, devices by type (the machine says which): the same across ranks."""
    parts = key if isinstance(key, tuple) else (key,)
    return repr(tuple(part.type if isinstance(part, torch.device) else part for part in parts))


def entries_per_token(n_entries: int, n_tokens: int) -> int:
    """Entries per token rounded up to a power of two: the part of a sparse kernel's key that moves.

    A step whose count moves a little (BatchTopK's per-batch budget) reuses
    one choice, while the dead-latent loss's many per token gets its own.
    """
    per_token = max(1, n_entries // max(1, n_tokens))
    return 1 << (per_token - 1).bit_length()


def choices() -> dict[str, dict[str, str]]:
    """Each kernel's candidate per key so far in this process (a fixed choice under ``"*"``).

    What a run used, to be pinned with ``SAE_MATRYOSHKA_KERNELS`` to
    reproduce it on another machine.
    """
    used: dict[str, dict[str, str]] = {}
    for kernel in _KERNELS:
        fixed = kernel.fixed()
        picks = {"*": fixed} if fixed is not None else {}
        picks |= {_describe(key): name for key, name in kernel.chosen.items()}
        if picks:
            used.setdefault(kernel.name, {}).update(picks)
    return used


def _time(
    candidate: Callable[..., object], args: tuple[object, ...], device: torch.device
) -> float:
    """The fastest of ``_TIMED_CALLS`` calls of ``candidate(*args)``, after one untimed call."""
    candidate(*args)
    best = float("inf")
    for _ in range(_TIMED_CALLS):
        _synchronize(device)
        start = time.perf_counter()
        candidate(*args)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
