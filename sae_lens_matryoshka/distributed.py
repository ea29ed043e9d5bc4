"""Data-parallel training under ``torchrun``, with SAELens's own runner and trainer.

Every rank builds the same runner, reads a disjoint shard of the token stream
(or of a cached-activation dataset), and trains a replica of one SAE. What
keeps the replicas one SAE:

- gradients are averaged across ranks as they are accumulated (a hook per
  parameter), before SAELens clips them and Adam steps, so every rank takes the
  same step; parameters and buffers are broadcast from rank 0 at the start;
- **BatchTopK selects across the global batch**: the ``k * n_tokens * world_size``
  largest pre-activations of all ranks together, exactly what one process sees
  on the concatenated batch (ranks exchange only their local top candidates'
  values). Per-rank selection would let a rank with quiet tokens keep weak
  activations another rank's strong ones would have displaced;
- a latent is dead only if it fired on no rank within the window (the AND of
  the ranks' dead masks), and the inference threshold tracks the smallest kept
  activation over all ranks, so the aux loss and the saved threshold are the
  single-process ones;
- the prefix sampler and learning-rate and coefficient schedules advance
  identically on every rank from the same seed and step count.

Rank 0 alone logs, writes checkpoints, saves the result and shows progress
and warnings. Ranks meet within ``SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT`` seconds
(default 120), naming any that never arrive; collectives time out after
``SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT`` seconds (default 600), so a rank that
dies makes the others stop with :class:`CollectiveError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TrainingSAE
from sae_lens.training import sae_trainer
from tqdm.auto import tqdm
from typing_extensions import override

from sae_lens_matryoshka.collectives import Collectives, kept_entries
from sae_lens_matryoshka.sparse_kernels import batch_topk_entries
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

TIMEOUT_ENV = "SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
RENDEZVOUS_TIMEOUT_ENV = "SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective operation across ranks failed: another rank died, stalled or diverged."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def quiet_other_ranks() -> Iterator[None]:
    """On ranks other than 0: no progress bar, no warnings, SAELens logs errors only."""
    if rank() == 0:
        yield
        return
    sae_lens_logger = logging.getLogger("sae_lens")
    level, bar = sae_lens_logger.level, sae_trainer.tqdm
    sae_lens_logger.setLevel(logging.ERROR)
    sae_trainer.tqdm = partial(tqdm, disable=True)  # the trainer's bar
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sae_lens_logger.setLevel(level)
        sae_trainer.tqdm = bar


def _env_int(name: str, default: int | None, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; torchrun sets it.")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} must be a whole number >= {minimum}."
        ) from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}.")
    return value


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"environment variable {name}={raw!r} must be a positive number of seconds."
        )
    return value


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ...), if any.

    Returns whether training is data-parallel. NCCL on GPUs (each rank on
    ``cuda:LOCAL_RANK``), gloo on CPU. Every rank first waits for the others
    at most ``SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT`` seconds (default 120) and
    fails naming the ranks that never arrived; collectives then time out after
    ``timeout_s`` (default ``SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT``, 600 s), long
    enough for rank 0's evals and checkpoints between steps.
    """
    n_ranks = _env_int("WORLD_SIZE", 1, minimum=1)
    if n_ranks <= 1:
        return False
    if dist.is_initialized():
        return world_size() > 1
    this_rank = _env_int("RANK", None, minimum=0)
    if this_rank >= n_ranks:
        raise ValueError(
            f"environment variable RANK={this_rank} must be below WORLD_SIZE={n_ranks}."
        )
    local_rank = _env_int("LOCAL_RANK", 0, minimum=0)
    if timeout_s is None:
        timeout_s = _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    store = _rendezvous(
        this_rank, n_ranks, _env_seconds(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)
    )
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend,
        store=store,
        rank=this_rank,
        world_size=n_ranks,
        timeout=timedelta(seconds=timeout_s),
    )
    return world_size() > 1


def _rendezvous(this_rank: int, n_ranks: int, timeout_s: float) -> dist.Store:
    """Meet the other ranks at ``MASTER_ADDR:MASTER_PORT``, naming any that do not come."""
    address = os.environ.get("MASTER_ADDR")
    if not address:
        raise ValueError("environment variable MASTER_ADDR is not set; torchrun sets it.")
    port = _env_int("MASTER_PORT", None, minimum=1)
    # under torchrun the launcher hosts the store (as torch's own env:// rendezvous assumes)
    agent_hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = timedelta(seconds=timeout_s)
    try:
        client = dist.TCPStore(
            address,
            port,
            n_ranks,
            is_master=this_rank == 0 and not agent_hosted,
            timeout=timeout,
            wait_for_workers=False,
        )
    except (RuntimeError, dist.DistError) as error:
        raise CollectiveError(
            f"rank {this_rank} of {n_ranks} could not reach the rendezvous at {address}:{port} "
            f"within {timeout_s:g} s ({RENDEZVOUS_TIMEOUT_ENV}): is rank 0 running? Cause: {error}"
        ) from error
    store: dist.Store = client
    if agent_hosted:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"/worker/attempt_{attempt}", client)
    arrivals = dist.PrefixStore("sae_matryoshka_rendezvous", store)
    arrivals.set(str(this_rank), "here")
    deadline = time.monotonic() + timeout_s
    missing = list(range(n_ranks))
    while missing:
        missing = [r for r in missing if not arrivals.check([str(r)])]
        if missing and time.monotonic() > deadline:
            raise CollectiveError(
                f"rank {this_rank} of {n_ranks}: ranks {missing} did not join within "
                f"{timeout_s:g} s ({RENDEZVOUS_TIMEOUT_ENV}); they failed to start, or were "
                "not launched."
            )
        if missing:
            time.sleep(0.05)
    return store


def _collective(what: str, operation: Callable[[], T]) -> T:
    try:
        return operation()
    except (RuntimeError, dist.DistError) as error:
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: {what} failed. Another rank has probably died "
            f"or stalled (the collective timeout is set by {TIMEOUT_ENV}, in seconds). "
            f"Cause: {error}"
        ) from error


def _average_gradient(param: torch.Tensor) -> None:
    grad = param.grad
    assert grad is not None
    # collectives need contiguous memory; a sparse backward may hand over a transposed view
    buffer = grad if grad.is_contiguous() else grad.contiguous()
    _collective("averaging gradients", lambda: dist.all_reduce(buffer))
    buffer.div_(world_size())
    if buffer is not grad:
        grad.copy_(buffer)


class DataParallelCollectives(Collectives):
    """The batch-global operations of a training step, over every rank's share of the batch."""

    @override
    def batch_topk(self, hidden_pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the BatchTopK selection over the global batch.

        The global batch keeps its ``k * n_tokens * world_size`` largest positive
        values (equal batches on every rank). No rank can contribute more than
        that, so each takes its local top that many, the ranks exchange those
        values, and each keeps its entries at or above the global cut-off. Exact
        up to ties at the cut-off across ranks.
        """
        n_ranks = world_size()
        n_keep = min(kept_entries(k, hidden_pre, n_ranks), hidden_pre.numel())
        token, latent = batch_topk_entries(hidden_pre, n_keep)
        values = hidden_pre[token, latent]
        local = torch.full((n_keep,), -torch.inf, dtype=values.dtype, device=values.device)
        local[: values.numel()] = values
        gathered = [torch.empty_like(local) for _ in range(n_ranks)]
        _collective("the global BatchTopK selection", lambda: dist.all_gather(gathered, local))
        cutoff = torch.cat(gathered).topk(n_keep, sorted=False).values.min()
        keep = values >= cutoff
        return token[keep], latent[keep]

    @override
    def dead_everywhere(self, dead: torch.Tensor) -> torch.Tensor:
        """Dead on every rank (fired on none within the window): the single-process dead mask."""
        flags = dead.to(torch.uint8)
        _collective(
            "agreeing on dead latents", lambda: dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        )
        return flags.bool()

    @override
    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        _collective(
            "agreeing on the threshold", lambda: dist.all_reduce(value, op=dist.ReduceOp.MIN)
        )
        return value

    @override
    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        total = partial.contiguous().clone()
        _collective("summing over the global batch", lambda: dist.all_reduce(total))
        return total


def prepare_data_parallel(sae: TrainingSAE[Any]) -> None:
    """Make ``sae`` one replica of a data-parallel SAE (call on every rank, before training).

    Broadcasts rank 0's parameters and buffers, averages every gradient across
    ranks as it is accumulated, and gives the SAE the collectives that make its
    batch-global state (BatchTopK selection, dead latents, inference threshold)
    global.
    """
    if world_size() <= 1:
        return
    if not isinstance(sae, MatryoshkaTrainingSAE):
        raise ValueError(
            f"Data-parallel training needs architecture 'matryoshka' (got {type(sae).__name__}, "
            f"architecture {sae.cfg.architecture()!r}): other SAEs would select BatchTopK and "
            "track dead latents per rank, silently unlike a single-process run."
        )
    # the prefix sampler's state stays on the CPU, and is the same on every rank
    # (same seed, same steps); everything else starts as rank 0's
    shared = [t for t in [*sae.parameters(), *sae.buffers()] if t.device == sae.W_dec.device]
    with torch.no_grad():
        for tensor in shared:
            _collective("broadcasting the initial weights", partial(dist.broadcast, tensor, 0))
    for param in sae.parameters():
        param.register_post_accumulate_grad_hook(_average_gradient)
    sae.collectives = DataParallelCollectives()


def shard_activation_source(runner: LanguageModelSAETrainingRunner) -> None:
    """Give this rank a disjoint shard of the runner's token dataset or activation cache."""
    store = runner.activations_store
    n_ranks, index = world_size(), rank()
    if store.cached_activation_dataset is not None:
        store.cached_activation_dataset = store.cached_activation_dataset.shard(
            n_ranks, index, contiguous=True
        )
    if isinstance(store.dataset, Dataset):
        store.dataset = store.dataset.shard(n_ranks, index, contiguous=True)
    elif isinstance(store.dataset, IterableDataset):
        store.dataset = split_dataset_by_node(store.dataset, rank=index, world_size=n_ranks)
    if store.dataset is not None:
        store.iterable_sequences = store._iterate_tokenized_sequences()


def rank_config(cfg: LanguageModelSAERunnerConfig[Any]) -> LanguageModelSAERunnerConfig[Any]:
    """Rank 0 keeps the config; the others neither log, checkpoint nor save."""
    if rank() == 0:
        return cfg
    return dataclasses.replace(
        cfg,
        logger=dataclasses.replace(cfg.logger, log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        output_path=None,
    )


def build_runner(
    cfg: LanguageModelSAERunnerConfig[Any], **overrides: Any
) -> LanguageModelSAETrainingRunner:
    """SAELens's runner for ``cfg``: one data-parallel replica under ``torchrun``, else plain.

    ``overrides`` go to the runner (``override_model``, ``override_dataset``,
    ...). Under ``torchrun`` this joins the other ranks, gives this rank its
    shard of the data and makes its SAE a replica; ranks other than 0 build
    and train quietly (see ``progress.quiet_other_ranks``).
    """
    if not init_from_env():
        return LanguageModelSAETrainingRunner(cfg, **overrides)
    if cfg.sae.normalize_activations not in ("none", "constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"normalize_activations={cfg.sae.normalize_activations!r} estimates statistics from "
            "each rank's own batches, which would differ across ranks; use 'none' (or estimate "
            "the scale once and fold it into the activations) for data-parallel training."
        )
    with quiet_other_ranks():
        runner = LanguageModelSAETrainingRunner(rank_config(cfg), **overrides)
    shard_activation_source(runner)
    prepare_data_parallel(runner.sae)
    if rank() == 0:
        print(
            f"sae-lens-matryoshka: data-parallel training on {world_size()} ranks, "
            f"{cfg.train_batch_size_tokens * world_size()} tokens per global batch, "
            f"{cfg.training_tokens * world_size()} tokens in all",
            file=sys.stderr,
        )
    return runner


def train(runner: LanguageModelSAETrainingRunner) -> TrainingSAE[Any]:
    """Run ``runner`` (from ``build_runner``), ranks other than 0 quietly; return the SAE."""
    with quiet_other_ranks():
        return runner.run()


def run(cfg: LanguageModelSAERunnerConfig[Any], **overrides: Any) -> TrainingSAE[Any]:
    """Train with SAELens's runner: data-parallel under ``torchrun``, a plain run otherwise.

    ``train_batch_size_tokens`` and ``training_tokens`` are per rank: the global
    batch and the tokens trained on in all are ``world_size`` times larger
    (scale the learning rate accordingly).
    """
    return train(build_runner(cfg, **overrides))
