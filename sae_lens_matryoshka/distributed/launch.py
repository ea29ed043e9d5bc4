"""Training under ``torchrun``, with SAELens's own runner: data parallel and latent sharding.

The ranks form a mesh (``mesh.Mesh``) of replicas x latent shards. Each
replica reads a disjoint shard of the token stream (or of a cached-activation
dataset); within a replica, ``latent_shards`` ranks read the same tokens and
each holds a slice of the latents (``sharding``). With one shard per replica
this is plain data parallelism. What keeps the ranks one SAE:

- gradients are averaged across replicas as they are accumulated (a hook per
  parameter), before SAELens clips them and Adam steps, so every replica takes
  the same step; parameters and buffers start as the first replica's;
- **BatchTopK selects across the global batch**: the ``k * n_tokens * n_replicas``
  largest pre-activations of all ranks together, exactly what one process sees
  on the concatenated batch (ranks exchange only counts, to find the global
  cut-off). Per-rank selection would let a rank with quiet tokens keep weak
  activations another rank's strong ones would have displaced;
- a latent is dead only if it fired on no rank within the window (the AND of
  the ranks' dead masks), and the inference threshold tracks the smallest kept
  activation over all ranks, so the aux loss and the saved threshold are the
  single-process ones;
- the prefix sampler and learning-rate and coefficient schedules advance
  identically on every rank from the same seed and step count.

Rank 0 alone logs, saves the result and shows progress and warnings; it
writes the checkpoints (with the latents sharded, each shard of the first
replica writes its own part). Ranks meet within
``SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT`` seconds (default 120), naming any that
never arrive; collectives time out after ``SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT``
seconds (default 600), so a rank that dies makes the others stop with
:class:`CollectiveError` instead of hanging.

**The ranks agree before they train** (``agreement``): each posts what it
was launched with at the rendezvous and compares it with the others', so a
rank launched with other settings is an error on every rank naming the
fields, never a diverged copy or a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TrainingSAE
from sae_lens.constants import RUNNER_CFG_FILENAME

from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.distributed.agreement import (
    RENDEZVOUS_TIMEOUT_ENV,
    Board,
    agree_in_group,
    run_settings,
)
from sae_lens_matryoshka.distributed.mesh import (
    TIMEOUT_ENV,
    CollectiveError,
    Mesh,
    MeshCollectives,
    collective,
)
from sae_lens_matryoshka.distributed.sharding import (
    SHARDED_DIMENSIONS,
    check_shardable,
    save_whole,
    sharded_training_sae,
)
from sae_lens_matryoshka.progress import hidden_trainer_bar
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0
#: the longest timeout taken, in seconds (a year): ``timedelta`` refuses more than about
#: 8.6e13 s, and torch's store and process groups, which add the timeout to the clock in
#: nanoseconds, time out at once or hang from about 9e9 s; a year is beyond any real wait
MAX_TIMEOUT_S = 365 * 24 * 3600
#: the TCP ports ``MASTER_PORT`` can name
PORTS = (1, 65535)


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
    level = sae_lens_logger.level
    sae_lens_logger.setLevel(logging.ERROR)
    try:
        with hidden_trainer_bar(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sae_lens_logger.setLevel(level)


def _env_int(name: str, default: int | None, minimum: int, maximum: int | None = None) -> int:
    """The whole number in environment variable ``name``, refused by name outside its range.

    Torch would take an out-of-range value and fail later with a bare
    ``TypeError`` or ``OverflowError`` (a ``MASTER_PORT`` of 99999) that
    names no variable.
    """
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; torchrun sets it.")
        return default
    allowed = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} must be a whole number {allowed}."
        ) from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"environment variable {name}={raw!r} must be {allowed}.")
    return value


def _checked_seconds(value: float, what: str) -> float:
    """``value`` as a timeout in seconds, refused naming ``what`` unless torch can wait that long.

    ``timedelta`` raises a bare ``OverflowError`` above about 8.6e13 s, and
    torch misbehaves far below that (see :data:`MAX_TIMEOUT_S`).
    """
    if not math.isfinite(value) or value <= 0 or value > MAX_TIMEOUT_S:
        raise ValueError(
            f"{what} must be a positive number of seconds, at most {MAX_TIMEOUT_S} (a year)."
        )
    return value


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    return _checked_seconds(value, f"environment variable {name}={raw!r}")


def init_from_env(
    timeout_s: float | None = None, settings: Mapping[str, str] | None = None
) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ...), if any.

    Returns whether training is data-parallel. NCCL on GPUs (each rank on
    ``cuda:LOCAL_RANK``), gloo on CPU. Every rank first waits for the others
    at most ``SAE_MATRYOSHKA_RENDEZVOUS_TIMEOUT`` seconds (default 120) and
    fails naming the ranks that never arrived; collectives then time out after
    ``timeout_s`` (default ``SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT``, 600 s), long
    enough for rank 0's evals and checkpoints between steps.

    ``settings`` (:func:`run_settings`: what this rank was launched with) are
    compared with every other rank's at the rendezvous, or over the process
    group where it already exists; ``WORLD_SIZE`` is compared either way. A
    difference is a ``ValueError`` on every rank naming each field and its
    value per rank, before any collective can hang or train a diverged copy.
    """
    n_ranks = _env_int("WORLD_SIZE", 1, minimum=1)
    if n_ranks <= 1:
        return False
    if dist.is_initialized():
        if settings is not None and world_size() > 1:
            agree_in_group(settings)
        return world_size() > 1
    this_rank = _env_int("RANK", None, minimum=0)
    if this_rank >= n_ranks:
        raise ValueError(
            f"environment variable RANK={this_rank} must be below WORLD_SIZE={n_ranks}."
        )
    local_rank = _env_int("LOCAL_RANK", 0, minimum=0)
    if timeout_s is None:
        timeout_s = _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    else:
        timeout_s = _checked_seconds(timeout_s, f"timeout_s={timeout_s!r}")
    rendezvous_s = _env_seconds(RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT_S)
    store = _rendezvous(this_rank, n_ranks, rendezvous_s, {} if settings is None else settings)
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


def _rendezvous(
    this_rank: int, n_ranks: int, timeout_s: float, settings: Mapping[str, str]
) -> dist.Store:
    """Meet the other ranks at ``MASTER_ADDR:MASTER_PORT``: all come, with the same settings."""
    address = os.environ.get("MASTER_ADDR")
    if not address:
        raise ValueError("environment variable MASTER_ADDR is not set; torchrun sets it.")
    port = _env_int("MASTER_PORT", None, minimum=PORTS[0], maximum=PORTS[1])
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
    board = Board(
        dist.PrefixStore("sae_matryoshka_rendezvous", store),
        this_rank,
        n_ranks,
        f"{address}:{port}",
        hosting=this_rank == 0 and not agent_hosted,
    )
    board.meet(settings, timeout_s)
    return store


def _synchronise_gradient(param: torch.Tensor, mesh: Mesh, over_shards: bool) -> None:
    """Make ``param``'s gradient the whole batch's, on every rank that holds ``param``.

    The replicas of a tensor average their gradients (each saw a share of the
    batch's tokens). ``b_dec``, held whole by every shard, first sums over the
    shards: each contributed the part of its gradient that flows through its
    own latents.
    """
    grad = param.grad
    assert grad is not None
    # collectives need contiguous memory; a sparse backward may hand over a transposed view
    buffer = grad if grad.is_contiguous() else grad.contiguous()
    if over_shards:
        collective("summing gradients", lambda: dist.all_reduce(buffer, group=mesh.shard_group))
    if mesh.n_replicas > 1:
        what = "averaging gradients"
        collective(what, lambda: dist.all_reduce(buffer, group=mesh.replica_group))
        buffer.div_(mesh.n_replicas)
    if buffer is not grad:
        grad.copy_(buffer)


#: the gradient norm SAELens's trainer clips to (``clip_grad_norm_(sae.parameters(), 1.0)``)
SAELENS_CLIP_NORM = 1.0


class _WholeGradientClip:
    """Clip the whole sharded SAE's gradient, as SAELens clips one process's, once backward ends.

    SAELens's trainer clips the norm of ``sae.parameters()``' gradients, on
    each rank: with the latents sharded that would be one shard's norm. At the
    end of every backward this scales every rank's gradients by the factor
    the whole SAE's norm gives (shared tensors, equal on every shard, counted
    once); the trainer's own clip then finds a norm within bounds and changes
    nothing.
    """

    def __init__(self, sae: TrainingSAE[Any], mesh: Mesh) -> None:
        self.parameters = dict(sae.named_parameters())
        self.mesh = mesh
        self.queued = False

    def queue(self, _param: torch.Tensor) -> None:
        """A post-accumulate hook: run :meth:`clip` once, when this backward has finished."""
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.clip)

    @torch.no_grad()
    def clip(self) -> None:
        self.queued = False
        grads = {
            name: param.grad for name, param in self.parameters.items() if param.grad is not None
        }
        zero = next(iter(self.parameters.values())).new_zeros((), dtype=torch.float32)
        sharded = sum(
            (g.float().pow(2).sum() for n, g in grads.items() if n in SHARDED_DIMENSIONS), zero
        )
        shared = sum(
            (g.float().pow(2).sum() for n, g in grads.items() if n not in SHARDED_DIMENSIONS), zero
        )
        what = "the whole SAE's gradient norm"
        sharded = sharded.clone()
        collective(what, lambda: dist.all_reduce(sharded, group=self.mesh.shard_group))
        norm = (sharded + shared).sqrt()
        factor = (SAELENS_CLIP_NORM / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads.values():
            grad.mul_(factor.to(grad.dtype))


def prepare_distributed(sae: TrainingSAE[Any], mesh: Mesh) -> None:
    """Make ``sae`` this rank's part of a distributed SAE (every rank, before training).

    Every replica starts as the first replica (parameters and buffers are
    broadcast, each shard's from its first replica), gradients are
    synchronised as they are accumulated (and, when sharded, clipped by the
    whole SAE's norm), and the SAE gets the collectives
    that make its batch-global state (BatchTopK selection, dead latents,
    inference threshold) and, when sharded, its selections and
    reconstructions span every rank. A sharded SAE comes from
    :func:`sharding.sharded_training_sae`.
    """
    if dist.get_world_size() <= 1:
        return
    if not isinstance(sae, MatryoshkaTrainingSAE):
        raise ValueError(
            f"Distributed training needs architecture 'matryoshka' (got {type(sae).__name__}, "
            f"architecture {sae.cfg.architecture()!r}): other SAEs would select BatchTopK and "
            "track dead latents per rank, silently unlike a single-process run."
        )
    if mesh.n_shards > 1 and sae.W_dec.shape[0] != sae.cfg.d_sae // mesh.n_shards:
        raise ValueError(
            "a latent-sharded run needs each rank's shard of the SAE "
            "(sharding.sharded_training_sae), not the whole dictionary."
        )
    # the prefix sampler's state stays on the CPU, and is the same on every rank
    # (same seed, same steps); everything else starts as its first replica's
    with torch.no_grad():
        for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
            if tensor.device != sae.W_dec.device:
                continue
            per_shard = mesh.n_shards > 1 and name in SHARDED_DIMENSIONS
            group = mesh.replica_group if per_shard else None
            source = mesh.first_rank_of(mesh.replica_group) if per_shard else 0
            collective(
                "broadcasting the initial weights",
                partial(dist.broadcast, tensor, source, group=group),
            )
    clip = _WholeGradientClip(sae, mesh) if mesh.n_shards > 1 else None
    for name, param in sae.named_parameters():
        over_shards = mesh.n_shards > 1 and name not in SHARDED_DIMENSIONS
        param.register_post_accumulate_grad_hook(
            partial(_synchronise_gradient, mesh=mesh, over_shards=over_shards)
        )
        if clip is not None:
            param.register_post_accumulate_grad_hook(clip.queue)
    if not isinstance(sae.collectives, MeshCollectives):
        sae.collectives = MeshCollectives(mesh, sae.cfg.d_sae)


def shard_activation_source(runner: LanguageModelSAETrainingRunner, mesh: Mesh) -> None:
    """Give this rank its replica's disjoint shard of the token dataset or activation cache.

    The shards of one replica read the same tokens.
    """
    store = runner.activations_store
    n_parts, index = mesh.n_replicas, mesh.replica
    if store.cached_activation_dataset is not None:
        store.cached_activation_dataset = store.cached_activation_dataset.shard(
            n_parts, index, contiguous=True
        )
    if isinstance(store.dataset, Dataset):
        store.dataset = store.dataset.shard(n_parts, index, contiguous=True)
    elif isinstance(store.dataset, IterableDataset):
        store.dataset = split_dataset_by_node(store.dataset, rank=index, world_size=n_parts)
    if store.dataset is not None:
        store.iterable_sequences = store._iterate_tokenized_sequences()


def rank_config(
    cfg: LanguageModelSAERunnerConfig[Any], mesh: Mesh
) -> LanguageModelSAERunnerConfig[Any]:
    """This rank's runner config.

    Rank 0 alone logs and saves; with the latents sharded the whole SAE is
    gathered and saved after training (``train``), so no rank's runner saves,
    each shard of the first replica checkpoints its own part, and resuming
    reads this rank's part of the checkpoint.
    """
    sharded = mesh.n_shards > 1
    checkpoints = mesh.replica == 0 if sharded else dist.get_rank() == 0
    rank_cfg = dataclasses.replace(
        cfg,
        logger=dataclasses.replace(
            cfg.logger, log_to_wandb=cfg.logger.log_to_wandb and dist.get_rank() == 0
        ),
        n_checkpoints=cfg.n_checkpoints if checkpoints else 0,
        save_final_checkpoint=cfg.save_final_checkpoint and checkpoints,
        output_path=cfg.output_path if dist.get_rank() == 0 and not sharded else None,
    )
    # set after construction: the config appends a fresh run id to a checkpoint path
    rank_cfg.checkpoint_path = cfg.checkpoint_path if checkpoints else None
    if sharded and cfg.resume_from_checkpoint is not None:
        part = mesh.part(cfg.sae.d_sae)
        rank_cfg.resume_from_checkpoint = str(Path(cfg.resume_from_checkpoint) / part.name)
    return rank_cfg


class TrainingRun(NamedTuple):
    """A runner ready to train, and where this run sits among the ranks."""

    runner: LanguageModelSAETrainingRunner
    #: ``None`` in a single process
    mesh: Mesh | None
    #: the config as given (``runner.cfg`` is this rank's version of it)
    cfg: LanguageModelSAERunnerConfig[Any]


def _agree_on_checkpoint_path(cfg: LanguageModelSAERunnerConfig[Any]) -> None:
    """Give every rank rank 0's checkpoint folder (each config drew its own run id)."""
    shared = [cfg.checkpoint_path]
    collective("agreeing on the checkpoint folder", lambda: dist.broadcast_object_list(shared))
    cfg.checkpoint_path = shared[0]


class _NoEvalsOnOneShard:
    """The evaluator of a latent-sharded run: evals during training would see one shard."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, *_args: Any, **_kwargs: Any) -> dict[str, Any]:
        if not self.warned:
            warnings.warn(
                "evals during a latent-sharded run are skipped (rank 0 holds one shard of the "
                "latents); evaluate the saved SAE, e.g. with evals.evaluate_levels.",
                stacklevel=2,
            )
            self.warned = True
        return {}


def build_runner(
    cfg: LanguageModelSAERunnerConfig[Any], latent_shards: int = 1, **overrides: Any
) -> TrainingRun:
    """SAELens's runner for ``cfg``, as this rank's part of the run under ``torchrun``.

    Without ``torchrun``, a plain runner. Under it, ``WORLD_SIZE`` ranks
    form ``WORLD_SIZE / latent_shards`` data-parallel replicas of an SAE whose
    latents are split over ``latent_shards`` ranks (see ``mesh``, ``sharding``):
    this rank joins the others, gets its replica's shard of the data and its
    part of the SAE. ``overrides`` go to the runner (``override_model``,
    ``override_dataset``, ...). Ranks other than 0 build and train quietly.
    """
    if latent_shards < 1:
        raise ValueError(f"latent_shards must be a whole number >= 1, got {latent_shards!r}.")
    if not init_from_env(settings=run_settings(cfg, latent_shards)):
        if latent_shards > 1:
            raise ValueError(
                f"latent_shards={latent_shards} splits the SAE over {latent_shards} ranks: "
                f"launch with torchrun and a multiple of {latent_shards} processes."
            )
        return TrainingRun(LanguageModelSAETrainingRunner(cfg, **overrides), None, cfg)
    if cfg.sae.normalize_activations not in ("none", "constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"normalize_activations={cfg.sae.normalize_activations!r} estimates statistics from "
            "each rank's own batches, which would differ across ranks; use 'none' (or estimate "
            "the scale once and fold it into the activations) for data-parallel training."
        )
    mesh = Mesh.of_world(latent_shards)
    if latent_shards > 1:
        if not isinstance(cfg.sae, MatryoshkaTrainingSAEConfig):
            raise ValueError("latent sharding trains architecture 'matryoshka' only.")
        check_shardable(cfg.sae, latent_shards)
        if cfg.from_pretrained_path is not None or "override_sae" in overrides:
            raise ValueError(
                "a latent-sharded run builds its own shards of a new SAE; to continue a "
                "sharded run, use resume_from_checkpoint."
            )
        _agree_on_checkpoint_path(cfg)
    rank_cfg = rank_config(cfg, mesh)
    if latent_shards > 1:
        torch.manual_seed(cfg.seed)  # every rank draws the same stream and keeps its rows
        sae_cfg = MatryoshkaTrainingSAEConfig.from_dict(rank_cfg.get_training_sae_cfg_dict())
        overrides["override_sae"] = sharded_training_sae(sae_cfg, mesh)
    with quiet_other_ranks():
        runner = LanguageModelSAETrainingRunner(rank_cfg, **overrides)
    shard_activation_source(runner, mesh)
    prepare_distributed(runner.sae, mesh)
    if latent_shards > 1:
        runner.evaluator = _NoEvalsOnOneShard()
    if dist.get_rank() == 0:
        layout = (
            f"{mesh.n_replicas} replica(s) x {mesh.n_shards} latent shards"
            if latent_shards > 1
            else f"{mesh.n_replicas} ranks"
        )
        print(
            f"sae-lens-matryoshka: distributed training on {layout}, "
            f"{cfg.train_batch_size_tokens * mesh.n_replicas} tokens per global batch, "
            f"{cfg.training_tokens * mesh.n_replicas} tokens in all",
            file=sys.stderr,
        )
    return TrainingRun(runner, mesh, cfg)


def train(run: TrainingRun) -> TrainingSAE[Any]:
    """Train ``run`` (from ``build_runner``), ranks other than 0 quietly; return this rank's SAE.

    A latent-sharded SAE is then gathered and saved whole to ``output_path``
    (with ``runner_cfg.json``), as SAELens's runner saves one.
    """
    with quiet_other_ranks():
        sae = run.runner.run()
    if run.mesh is not None and run.mesh.n_shards > 1 and run.cfg.output_path is not None:
        assert isinstance(sae, MatryoshkaTrainingSAE)
        folder = save_whole(sae, run.mesh, run.cfg.output_path)
        if folder is not None:
            (folder / RUNNER_CFG_FILENAME).write_text(json.dumps(run.cfg.to_dict()))
    return sae


def run(
    cfg: LanguageModelSAERunnerConfig[Any], latent_shards: int = 1, **overrides: Any
) -> TrainingSAE[Any]:
    """Train with SAELens's runner: distributed under ``torchrun``, a plain run otherwise.

    ``latent_shards`` ranks hold one SAE's latents between them; the others
    are data-parallel replicas. ``train_batch_size_tokens`` and
    ``training_tokens`` are per replica: the global batch and the tokens
    trained on in all are ``WORLD_SIZE / latent_shards`` times larger (scale
    the learning rate accordingly).
    """
    return train(build_runner(cfg, latent_shards, **overrides))
