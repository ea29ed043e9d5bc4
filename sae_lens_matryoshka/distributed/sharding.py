"""Latent sharding: one Matryoshka dictionary split over the ranks of a shard group.

A dictionary of ``d_sae`` latents is cut into ``n_shards`` equal, contiguous
slices; each rank of a shard group holds one slice: its columns of ``W_enc``,
entries of ``b_enc``, rows of ``W_dec`` and their optimizer state, so memory
per rank falls with the shard count. ``b_dec`` and the scalar state
(BatchTopK's threshold, the prefix sampler) are the same on every rank.
``mesh.MeshCollectives`` makes each training step equal to one process's on
the whole dictionary; this module builds the shard, checks what can be
sharded, and gathers the whole SAE back for saving.

- :func:`sharded_training_sae` builds this rank's shard, with
  ``MatryoshkaTrainingSAE.build_shard``, without ever allocating the whole
  dictionary: the SAE is built on the meta device, then its slice is
  initialised as SAELens initialises the whole (rows drawn shard after shard
  from the same random stream, so shards never repeat each other).
- :func:`gather_state` collects the whole state dict, slice by slice, into the
  CPU memory of the first rank, which :func:`save_whole` writes as the
  standard SAELens folder (``SAE.load_from_disk`` / ``SAE.from_pretrained``).
- Checkpoints stay sharded: each rank of the first replica writes its own
  complete SAELens checkpoint under ``<checkpoint>/shard-<s>-of-<n>`` (see
  ``checkpoints``), and resuming reads the rank's own (``distributed``).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import save_file

from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.distributed.mesh import Mesh, MeshCollectives, collective
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

#: the tensors split across shards, and the dimension that runs over latents
SHARDED_DIMENSIONS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def check_shardable(cfg: MatryoshkaTrainingSAEConfig, n_shards: int) -> None:
    """Refuse, saying why, a configuration latent sharding cannot train exactly."""
    name = type(cfg).__name__
    if cfg.activation not in ("batchtopk", "topk") or not cfg.sparse_training:
        raise ValueError(
            f"{name}: latent sharding trains the sparse path of batchtopk or topk (their "
            f"selections are exchanged between shards; the dense path would hold every "
            f"latent's activations on every rank); got activation={cfg.activation!r}, "
            f"training_path={cfg.training_path!r}."
        )
    if cfg.d_sae % n_shards:
        raise ValueError(
            f"{name}.d_sae={cfg.d_sae} cannot be split into {n_shards} equal latent shards: "
            "use a d_sae divisible by the shard count."
        )


def sharded_training_sae(cfg: MatryoshkaTrainingSAEConfig, mesh: Mesh) -> MatryoshkaTrainingSAE:
    """This rank's shard of a new training SAE, on ``cfg.device``, stepping over ``mesh``.

    Its part of the dictionary and its collectives are the mesh's; see
    ``MatryoshkaTrainingSAE.build_shard`` for how it is made and initialised.
    """
    check_shardable(cfg, mesh.n_shards)
    collectives = MeshCollectives(mesh, cfg.d_sae)
    return MatryoshkaTrainingSAE.build_shard(cfg, mesh.part(cfg.d_sae), collectives)


def gather_state(sae: MatryoshkaTrainingSAE, mesh: Mesh) -> dict[str, torch.Tensor] | None:
    """The whole SAE's state dict on the CPU of the first rank (``None`` on the others).

    Every rank calls it. The first replica's shards send their slices, one
    tensor at a time, so the first rank's device holds one slice more than
    its own at any moment; the whole dictionary is assembled in CPU memory.
    """
    state = sae.state_dict()
    if mesh.replica != 0:
        return None
    whole: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        dimension = SHARDED_DIMENSIONS.get(name)
        if dimension is None:
            whole[name] = tensor.detach().cpu()
            continue
        part = tensor.detach().contiguous()
        if mesh.shard != 0:
            collective(f"sending {name} to rank 0", partial(dist.send, part, dst=0))
            continue
        parts = [part.cpu()]
        for shard in range(1, mesh.n_shards):
            buffer = torch.empty_like(part)
            collective(
                f"receiving {name} from shard {shard}", partial(dist.recv, buffer, src=shard)
            )
            parts.append(buffer.cpu())
        whole[name] = torch.cat(parts, dim=dimension)
    return whole if mesh.shard == 0 else None


def save_whole(sae: MatryoshkaTrainingSAE, mesh: Mesh, path: str | Path) -> Path | None:
    """Write the whole trained SAE to ``path`` as ``save_inference_model`` would; every rank calls it.

    Returns the folder on the first rank, ``None`` on the others.
    """
    state = gather_state(sae, mesh)
    if state is None:
        return None
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sae.process_state_dict_for_saving_inference(state)
    save_file(state, folder / SAE_WEIGHTS_FILENAME)
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(sae.cfg.get_inference_sae_cfg_dict()))
    return folder
