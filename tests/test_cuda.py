"""On a CUDA device: the step equals the CPU's, bf16 autocast trains, checkpoints load back, one shard.

Skipped where there is no CUDA device (CI); ``benchmarks/gpu_check.sh`` runs
them on one (``pytest -m cuda``). ``test_device.py`` checks on every machine
that a step keeps its tensors on the SAE's device; these check what only a
GPU can show: that CUDA's kernels compute the step the CPU computes (float32
with TF32 off, to a tolerance: the reductions sum in another order), that a
run under SAELens's bf16 autocast trains with finite values, that a
checkpoint written from the GPU loads back onto it, and that the
latent-sharded code runs its collectives through NCCL, here with one shard on
one device (a process group of one), equal to the unsharded step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.distributed import Mesh
from sae_lens_matryoshka.distributed.sharding import sharded_training_sae
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import ACTIVATION_FIELDS, step_output, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
D_IN, D_SAE, N_TOKENS = 32, 512, 128
#: the penalty coefficients SAELens's trainer hands every step (each activation reads its own)
COEFFICIENTS = {"l0": 0.01, "l1": 0.01}


@pytest.fixture(autouse=True)
def _float32_matmuls() -> Iterator[None]:
    """TF32 off, so that CUDA's float32 matmuls are compared with the CPU's, not TF32's."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def _sae(activation: str, **fields: Any) -> MatryoshkaTrainingSAE:
    """A CPU SAE (``.to("cuda")`` a copy: the same initial weights on both devices)."""
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            matryoshka_widths=[32, 128, D_SAE],
            activation=activation,  # type: ignore[arg-type]
            **ACTIVATION_FIELDS[activation],
            **fields,
        )
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with directions to find (clear margins at the selection's cut-off), a third dead."""
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    codes = (torch.rand(N_TOKENS, D_SAE, generator=generator) < 0.01).float()
    x = codes @ directions + 0.05 * torch.randn(N_TOKENS, D_IN, generator=generator)
    return x, torch.arange(D_SAE) % 3 == 0


def _assert_same_step(on_cuda: MatryoshkaTrainingSAE, on_cpu: MatryoshkaTrainingSAE) -> None:
    """One step of each, on the same batch and dead latents: the same loss and gradients."""
    x, dead = _batch()
    expected = train_step(on_cpu, x, dead, **COEFFICIENTS)
    out = train_step(on_cuda, x.to(CUDA), dead.to(CUDA), **COEFFICIENTS)
    torch.testing.assert_close(out.loss.cpu(), expected.loss, rtol=1e-4, atol=1e-5)
    for (name, parameter), reference in zip(
        on_cuda.named_parameters(), on_cpu.parameters(), strict=True
    ):
        assert parameter.grad is not None and parameter.grad.is_cuda, name
        torch.testing.assert_close(
            parameter.grad.cpu(), reference.grad, rtol=1e-3, atol=1e-5, msg=name
        )


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("activation", list(ACTIVATION_FIELDS))
def test_the_cuda_step_equals_the_cpu_step(activation: str, path: str) -> None:
    if path == "sparse" and activation not in ("batchtopk", "topk"):
        pytest.skip("only k-sparse activations train on the sparse path")
    on_cpu = _sae(activation, training_path=path, use_matryoshka_aux_loss=True)
    _assert_same_step(copy.deepcopy(on_cpu).to(CUDA), on_cpu)


@pytest.mark.parametrize("activation", list(ACTIVATION_FIELDS))
def test_training_under_bf16_autocast_stays_finite(activation: str) -> None:
    """A few steps as SAELens's trainer takes them with ``autocast=True``: forward in bf16."""
    sae = _sae(activation, prefix_sampling="pareto", n_sampled_prefixes=4).to(CUDA)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x, dead = (tensor.to(CUDA) for tensor in _batch())
    for step in range(5):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_output(sae, x, dead, step=step, **COEFFICIENTS)
        out.loss.backward()  # outside autocast, as SAELens's trainer
        assert torch.isfinite(out.loss)
        optimizer.step()
    assert all(bool(torch.isfinite(parameter).all()) for parameter in sae.parameters())


def test_a_checkpoint_written_on_the_gpu_loads_back_onto_it(tmp_path: Path) -> None:
    """SAELens's trainer checkpoints a CUDA run; the checkpoint and the saved SAE load on CUDA."""
    sae = _sae("batchtopk").to(CUDA)
    x, _ = _batch()
    cfg = dataclasses.replace(
        short_run_trainer_config(20, batch_size=N_TOKENS, lr=3e-3, dead_feature_window=5),
        device="cuda",
        n_checkpoints=1,
        checkpoint_path=str(tmp_path / "checkpoints"),
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(lambda: x.to(CUDA), None)).fit()
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    resumed = MatryoshkaTrainingSAE.load_from_disk(checkpoint, device="cuda")
    for name, tensor in resumed.state_dict().items():
        assert tensor.device.type == "cuda", name
    sae.save_inference_model(tmp_path / "final")
    saved = MatryoshkaSAE.load_from_disk(tmp_path / "final", device="cuda")
    with torch.no_grad():
        codes = saved.encode(x.to(CUDA))
    assert codes.is_cuda and 0 < int((codes > 0).sum()) < codes.numel()


@pytest.fixture
def one_rank_nccl(tmp_path: Path) -> Iterator[Mesh]:
    """This process as a process group of one on NCCL, as a one-shard mesh."""
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path / 'rendezvous'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    try:
        yield Mesh.of_world(1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_a_latent_sharded_step_with_one_shard_equals_the_unsharded_step(
    activation: str, one_rank_nccl: Mesh
) -> None:
    """The mesh's collectives (BatchTopK's cut-off search, dead latents, threshold) over NCCL."""
    on_cpu = _sae(activation, use_matryoshka_aux_loss=True)
    cfg = copy.copy(on_cpu.cfg)
    cfg.device = "cuda"
    shard = sharded_training_sae(cfg, one_rank_nccl)
    shard.load_state_dict(on_cpu.state_dict())
    _assert_same_step(shard, on_cpu)
