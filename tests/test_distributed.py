"""Data-parallel training: 2 gloo processes on CPU equal 1 process on the concatenated batches.

The test spawns the ranks itself (bounded in time), runs SAELens's own
``SAETrainer`` on each with ``prepare_distributed``, and compares rank 0's
final weights with a single process trained on the global batches with the
same seed. Another test kills a rank mid-run: the survivor must stop with a
``CollectiveError`` instead of hanging.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.distributed import prepare_distributed
from sae_lens_matryoshka.distributed.mesh import CollectiveError, Mesh, global_cutoff
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import join_gloo, spawn_ranks

D_IN, D_SAE, RANK_BATCH, STEPS, WORLD = 10, 48, 24, 25, 2
VARIANTS: dict[str, dict[str, Any]] = {
    "batchtopk-sparse-aux": {"activation": "batchtopk", "k": 3, "use_matryoshka_aux_loss": True},
    "batchtopk-dense": {"activation": "batchtopk", "k": 2.5, "training_path": "dense"},
    "topk-pareto": {"activation": "topk", "k": 3, "prefix_sampling": "pareto"},
    # b_dec from the geometric median of the global batch, unit-norm rows, the EMA saved
    "paper-recipe": {
        "activation": "batchtopk",
        "k": 3,
        "b_dec_init": "geometric_median",
        "normalize_decoder": True,
        "rescale_acts_by_decoder_norm": False,
        "aux_loss_form": "dictionary_learning",
        "inference_threshold": "ema",
        "topk_threshold_start_step": 5,
    },
}


def _global_batches() -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    while True:
        codes = torch.rand(WORLD * RANK_BATCH, D_SAE, generator=generator) < 0.06
        yield codes.float() @ directions + 0.05 * torch.randn(
            WORLD * RANK_BATCH, D_IN, generator=generator
        )


def _rank_batches(rank: int, die_at: int | None = None) -> Iterator[torch.Tensor]:
    for step, batch in enumerate(_global_batches()):
        if step == die_at:
            os._exit(3)  # a crash: no cleanup, no goodbye to the other ranks
        yield batch[rank * RANK_BATCH : (rank + 1) * RANK_BATCH]


def _train(variant: str, data: Iterator[torch.Tensor], batch: int, parallel: bool) -> Any:
    torch.manual_seed(0)
    fields = {"d_in": D_IN, "d_sae": D_SAE, **VARIANTS[variant]}
    if fields.get("prefix_sampling") != "pareto":
        fields["matryoshka_widths"] = [6, 18, D_SAE]
    sae = MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**fields))
    if parallel:
        prepare_distributed(sae, Mesh.of_world(1))
    cfg = dataclasses.replace(
        short_run_trainer_config(STEPS, batch_size=batch, lr=3e-3, dead_feature_window=3),
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=3,
        lr_end=3e-4,
        lr_decay_steps=STEPS - 3,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()
    return {name: tensor.clone() for name, tensor in sae.state_dict().items()}


def _exactness_rank(rank: int, folder: Path) -> None:
    join_gloo(folder / "rendezvous", rank, WORLD)
    for variant in VARIANTS:
        state = _train(variant, _rank_batches(rank), RANK_BATCH, parallel=True)
        torch.save(state, folder / f"{variant}-rank{rank}.pt")
    other = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    try:
        prepare_distributed(other, Mesh.of_world(1))
    except ValueError as error:
        (folder / f"refusal-rank{rank}.txt").write_text(str(error))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batches(tmp_path: Path) -> None:
    spawn_ranks(_exactness_rank, (tmp_path,), WORLD, timeout_s=240)
    for variant in VARIANTS:
        single = _train(variant, _global_batches(), WORLD * RANK_BATCH, parallel=False)
        ranks = [torch.load(tmp_path / f"{variant}-rank{r}.pt") for r in range(WORLD)]
        for name, value in single.items():
            for rank_state in ranks:
                torch.testing.assert_close(
                    rank_state[name], value, rtol=1e-4, atol=1e-5, msg=f"{variant} {name}"
                )
        assert torch.equal(ranks[0]["W_dec"], ranks[1]["W_dec"])  # replicas never drift
    refusal = (tmp_path / "refusal-rank0.txt").read_text()
    assert "needs architecture 'matryoshka' (got BatchTopKTrainingSAE" in refusal


def _dying_rank(rank: int, folder: Path) -> None:
    join_gloo(folder / "rendezvous", rank, WORLD)
    start = time.monotonic()
    try:
        _train(
            "batchtopk-sparse-aux",
            _rank_batches(rank, die_at=5 if rank == 1 else None),
            RANK_BATCH,
            parallel=True,
        )
    except CollectiveError as error:
        report = {"message": str(error), "seconds": time.monotonic() - start}
        (folder / "survivor.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_a_dead_rank_makes_the_others_stop_with_a_clear_error(tmp_path: Path) -> None:
    context = mp.spawn(_dying_rank, args=(tmp_path,), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    for process in context.processes:
        process.join(timeout=max(deadline - time.monotonic(), 1))
        if process.is_alive():
            process.kill()
            pytest.fail("a surviving rank hung instead of stopping")
    assert context.processes[1].exitcode == 3
    report = json.loads((tmp_path / "survivor.json").read_text())
    assert "rank 0 of 2" in report["message"] and "died or stalled" in report["message"]
    assert report["seconds"] < 90


CUTOFF_WORLD = 3


def _cutoff_cases() -> Iterator[tuple[list[torch.Tensor], int]]:
    """Every rank's positive values (a rank may have none; ties across ranks), and an ``n_keep``."""
    generator = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for trial in range(12):
            shared = torch.rand(3, generator=generator) + 0.5  # values every rank holds
            ranks = []
            for rank in range(CUTOFF_WORLD):
                n = int(torch.randint(1, 40, (1,), generator=generator))
                scale = 10.0 ** float(torch.randint(-3, 4, (1,), generator=generator))
                values = torch.cat([torch.rand(n, generator=generator) * scale, shared]).to(dtype)
                ranks.append(values[values > 0] if trial % 4 != rank else values[:0])
            total = sum(len(values) for values in ranks)
            yield ranks, int(torch.randint(1, total + 5, (1,), generator=generator))


def _cutoff_rank(rank: int, folder: Path) -> None:
    join_gloo(folder / "rendezvous", rank, CUTOFF_WORLD)
    try:
        for ranks, n_keep in _cutoff_cases():
            union = torch.cat(ranks).sort(descending=True).values
            expected = union[n_keep - 1] if n_keep <= len(union) else union.new_zeros(())
            cutoff = global_cutoff(ranks[rank], n_keep, "the test's cut-off")
            assert cutoff.dtype == expected.dtype and cutoff == expected, (n_keep, cutoff, expected)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_global_cutoff_is_the_exact_kth_largest_of_every_ranks_values(tmp_path: Path) -> None:
    """The bisection over bit patterns (counts only) finds what gathering every value would."""
    spawn_ranks(_cutoff_rank, (tmp_path,), CUTOFF_WORLD, timeout_s=120)
