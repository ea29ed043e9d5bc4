"""Training on several processes: the ranks as a mesh, latent shards, and the torchrun launch.

A distributed run wraps the one-process training step; the step itself has
no shard or rank logic. ``mesh`` lays the ranks out as data-parallel
replicas x latent shards and implements the step's batch-global operations
over them (``MeshCollectives``); ``sharding`` builds, checks and gathers a
latent-sharded SAE; ``launch`` trains with SAELens's runner under
``torchrun`` (``run``, ``build_runner``, ``train``). The names below are the
public ones.
"""

from sae_lens_matryoshka.distributed.launch import (
    RENDEZVOUS_TIMEOUT_ENV,
    TrainingRun,
    build_runner,
    init_from_env,
    prepare_distributed,
    quiet_other_ranks,
    rank,
    rank_config,
    run,
    shard_activation_source,
    train,
    world_size,
)
from sae_lens_matryoshka.distributed.mesh import TIMEOUT_ENV, CollectiveError, Mesh

__all__ = [
    "RENDEZVOUS_TIMEOUT_ENV",
    "TIMEOUT_ENV",
    "CollectiveError",
    "Mesh",
    "TrainingRun",
    "build_runner",
    "init_from_env",
    "prepare_distributed",
    "quiet_other_ranks",
    "rank",
    "rank_config",
    "run",
    "shard_activation_source",
    "train",
    "world_size",
]
