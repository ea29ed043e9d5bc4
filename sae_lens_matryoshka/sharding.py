"""Latent sharding: one Matryoshka dictionary split over the ranks of a shard group.

A dictionary of ``d_sae`` latents is cut into ``n_shards`` equal, contiguous
slices; each rank of a shard group holds one slice: its columns of ``W_enc``,
entries of ``b_enc``, rows of ``W_dec`` and their optimizer state, so memory
per rank falls with the shard count. ``b_dec`` and the scalar state
(BatchTopK's threshold, the prefix sampler) are the same on every rank.
``mesh.MeshCollectives`` makes each training step equal to one process's on
the whole dictionary; this module builds the shard, checks what can be
sharded, and gathers the whole SAE back for saving.

- :func:`sharded_training_sae` builds this rank's shard without ever
  allocating the whole dictionary: the SAE is built on the meta device, then
  its slice is initialised as SAELens initialises the whole (rows drawn shard
  after shard from the same random stream, so shards never repeat each other).
- :func:`gather_state` collects the whole state dict, slice by slice, into the
  CPU memory of the first rank, which :func:`save_whole` writes as the
  standard SAELens folder (``SAE.load_from_disk`` / ``SAE.from_pretrained``).
- Checkpoints stay sharded: each rank of the first replica writes its own
  complete SAELens checkpoint under ``<checkpoint>/shard-<s>-of-<n>`` (see
  ``checkpoints``), and resuming reads the rank's own (``distributed``).
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import save_file
from torch import nn

from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.levels import training_levels
from sae_lens_matryoshka.mesh import Mesh, MeshCollectives, collective
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
    """This rank's shard of a new training SAE, on ``cfg.device``, and its collectives.

    The whole dictionary is never allocated: the SAE is built on the meta
    device, then its latents' parameters are made and initialised as
    SAELens's ``initialize_weights`` would (Kaiming-uniform decoder rows, rows
    scaled to ``decoder_init_norm``, ``W_enc = W_dec.T``, zero biases). The
    rows come from the global random stream one shard's block at a time, so
    every rank draws the same sequence and keeps its own block.
    """
    check_shardable(cfg, mesh.n_shards)
    start, stop = mesh.latent_range(cfg.d_sae)
    on_meta = copy.copy(cfg)
    on_meta.device = "meta"
    sae = MatryoshkaTrainingSAE(on_meta)
    device, dtype = torch.device(cfg.device), sae.dtype
    rows = stop - start
    for shard in range(mesh.n_shards):
        block = nn.init.kaiming_uniform_(torch.empty(rows, cfg.d_in, device=device, dtype=dtype))
        if shard == mesh.shard:
            W_dec = block
    if cfg.decoder_init_norm is not None:
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
    sae.W_dec = nn.Parameter(W_dec)
    sae.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
    sae.b_enc = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype))
    sae.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
    sae.cfg, sae.device = cfg, device
    # rebuilt on the real device: the activation's and the levels' state
    sae.activation_fn = sae.get_activation_fn()
    sae.levels = training_levels(cfg)
    sae.decoder_norm.initialize(sae.W_dec, sae.W_enc)
    sae.collectives = MeshCollectives(mesh, cfg.d_sae)
    left_on_meta = [name for name, tensor in sae.state_dict().items() if tensor.is_meta]
    if left_on_meta:  # a tensor this function does not know how to make
        raise RuntimeError(f"the shard's {left_on_meta} were never materialised.")
    return sae


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
