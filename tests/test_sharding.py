"""Latent sharding: 2 shards, and 2 shards x 2 replicas, equal one process with the whole SAE.

The test spawns gloo ranks on CPU (bounded in time). Each builds its shard of
the SAE with ``sharding.sharded_training_sae``, loads its slice of the single
process's initial weights, and then (a) takes one step on its replica's share
of a batch, reporting loss, gradients, selections, thresholds and dead masks,
and (b) trains several steps with SAELens's own ``SAETrainer``, after which the
whole SAE is gathered. Both must equal one process on the whole batch with the
whole dictionary, to float tolerance.
"""

from __future__ import annotations

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
from sae_lens import SAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.distributed import prepare_distributed
from sae_lens_matryoshka.distributed.mesh import CollectiveError, Mesh
from sae_lens_matryoshka.distributed.sharding import (
    SHARDED_DIMENSIONS,
    check_shardable,
    gather_state,
    save_whole,
    sharded_training_sae,
)
from sae_lens_matryoshka.io.checkpoints import PART_FILE, check_part
from sae_lens_matryoshka.io.interop import to_inference
from sae_lens_matryoshka.kernels import measured
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import join_gloo, spawn_ranks, step_output

D_IN, D_SAE, BATCH, STEPS = 10, 48, 24, 12
VARIANTS: dict[str, dict[str, Any]] = {
    "batchtopk-per-level-aux": {"activation": "batchtopk", "k": 3, "use_matryoshka_aux_loss": True},
    "topk-pareto": {"activation": "topk", "k": 3, "prefix_sampling": "pareto"},
    # b_dec from the geometric median, unit-norm rows, the variance-normalised aux, the EMA saved
    "paper-recipe": {
        "activation": "batchtopk",
        "k": 2.5,
        "b_dec_init": "geometric_median",
        "normalize_decoder": True,
        "rescale_acts_by_decoder_norm": False,
        "aux_loss_form": "dictionary_learning",
        "inference_threshold": "ema",
        "topk_threshold_start_step": 3,
    },
}
#: (shards, replicas)
LAYOUTS = [(2, 1), (2, 2)]


def _cfg(variant: str) -> MatryoshkaTrainingSAEConfig:
    # float64: the ranks sum in another order than one process, and Adam magnifies
    # float32's rounding of small gradients past any tolerance that would still catch a bug
    fields = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float64", **VARIANTS[variant]}
    if fields.get("prefix_sampling") != "pareto":
        fields["matryoshka_widths"] = [6, 18, 30, D_SAE]  # groups inside and across shards
    return MatryoshkaTrainingSAEConfig(**fields)


def _whole(variant: str) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(_cfg(variant))


def _batches(n_replicas: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    while True:
        codes = torch.rand(n_replicas * BATCH, D_SAE, generator=generator) < 0.06
        noise = 0.05 * torch.randn(n_replicas * BATCH, D_IN, generator=generator)
        yield (codes.float() @ directions + noise + 0.5).double()


def _replica_batches(n_replicas: int, replica: int) -> Iterator[torch.Tensor]:
    for batch in _batches(n_replicas):
        yield batch[replica * BATCH : (replica + 1) * BATCH]


def _dead_mask() -> torch.Tensor:
    # dead latents in every shard and every level's group; the group [18, 30), across the
    # shards' boundary, all dead, so that the per-level aux loss picks there by ranking
    # every column (kernels.selection.MaskedDeadLatents) and elsewhere by gathering
    latents = torch.arange(D_SAE)
    return (latents % 5 == 1) | ((latents >= 18) & (latents < 30))


def _shard_of(variant: str, mesh: Mesh) -> MatryoshkaTrainingSAE:
    """This rank's shard, holding its slice of the single process's initial weights."""
    sae = sharded_training_sae(_cfg(variant), mesh)
    whole = _whole(variant).state_dict()
    start, stop = mesh.latent_range(D_SAE)
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            dimension = SHARDED_DIMENSIONS.get(name)
            value = (
                whole[name]
                if dimension is None
                else whole[name].narrow(dimension, start, stop - start)
            )
            tensor.copy_(value)
    prepare_distributed(sae, mesh)
    return sae


def _step_report(sae: MatryoshkaTrainingSAE, x: torch.Tensor) -> dict[str, Any]:
    out = step_output(sae, x, _dead_mask(), step=0)
    out.loss.backward()
    # as SAELens's trainer clips: a shard's gradients were already clipped by the whole norm
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    return {
        "loss": out.loss.detach(),
        "losses": {name: value.detach() for name, value in out.losses.items()},
        "feature_acts": out.feature_acts.to_dense(),
        "sae_out": out.sae_out.detach(),
        "grads": {name: param.grad.clone() for name, param in sae.named_parameters()},
        "cutoff": sae.activation_fn.state_dict().get("last_cutoff"),
        "b_dec": sae.b_dec.detach().clone(),
        # the candidate each measured kernel ran in this process (pinned: under "*")
        "kernels": {name: picks.get("*") for name, picks in measured.choices().items()},
    }


def _exactness_rank(rank: int, folder: Path, n_shards: int, world: int) -> None:
    join_gloo(folder / "rendezvous", rank, world)
    mesh = Mesh.of_world(n_shards)
    for variant in VARIANTS:
        sae = _shard_of(variant, mesh)
        x = next(_replica_batches(mesh.n_replicas, mesh.replica))
        torch.save(_step_report(sae, x), folder / f"{variant}-step-rank{rank}.pt")

        sae = _shard_of(variant, mesh)
        cfg = short_run_trainer_config(STEPS, batch_size=BATCH, lr=3e-3, dead_feature_window=2)
        data = _replica_batches(mesh.n_replicas, mesh.replica)
        SAETrainer(cfg=cfg, sae=sae, data_provider=data).fit()
        state = gather_state(sae, mesh)
        if state is not None:
            torch.save(state, folder / f"{variant}-trained.pt")
        saved = save_whole(sae, mesh, folder / f"{variant}-saved")
        assert (saved is not None) == (rank == 0)
    dist.destroy_process_group()


def _single_step(variant: str, n_replicas: int) -> dict[str, Any]:
    sae = _whole(variant)
    return _step_report(sae, next(_batches(n_replicas)))


def _single_trained(variant: str, n_replicas: int) -> dict[str, torch.Tensor]:
    sae = _whole(variant)
    cfg = short_run_trainer_config(
        STEPS, batch_size=n_replicas * BATCH, lr=3e-3, dead_feature_window=2
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(n_replicas)).fit()
    return {name: tensor.clone() for name, tensor in sae.state_dict().items()}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=what)


#: every measured kernel on the candidate the suite does not pin (the ranks inherit it)
OTHER_CANDIDATES = (
    "encoder_weight_grad=bagged,group_decode=csr,decoder_weight_grad=csr,"
    "decode_values_grad=sampled,batch_topk_selection=topk"
)


@pytest.mark.parametrize(
    ("n_shards", "n_replicas", "kernels"),
    [*((*layout, "suite's kernels") for layout in LAYOUTS), (2, 1, "other candidates")],
)
@pytest.mark.slow
def test_sharded_training_equals_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_shards: int, n_replicas: int, kernels: str
) -> None:
    if kernels == "other candidates":
        monkeypatch.setenv("SAE_MATRYOSHKA_KERNELS", OTHER_CANDIDATES)
    pins = dict(pin.split("=") for pin in os.environ["SAE_MATRYOSHKA_KERNELS"].split(","))
    world = n_shards * n_replicas
    spawn_ranks(_exactness_rank, (tmp_path, n_shards, world), world, timeout_s=240)
    rows = D_SAE // n_shards
    for variant in VARIANTS:
        single = _single_step(variant, n_replicas)
        ranks = [torch.load(tmp_path / f"{variant}-step-rank{r}.pt") for r in range(world)]
        # each replica's loss covers its tokens: their mean is the whole batch's
        first_shards = ranks[::n_shards]
        loss = torch.stack([report["loss"] for report in first_shards]).mean()
        _close(loss, single["loss"], f"{variant} loss")
        for name, value in single["losses"].items():
            term = torch.stack([report["losses"][name] for report in first_shards]).mean()
            _close(term, value, f"{variant} {name}")
        for rank, report in enumerate(ranks):
            shard, replica = rank % n_shards, rank // n_shards
            where = f"{variant} rank {rank}"
            # the ranks measured nothing: each kernel is pinned as it is here
            assert report["kernels"] == pins, where
            # the shards of a replica compute one loss
            _close(report["loss"], ranks[replica * n_shards]["loss"], f"{where} loss")
            tokens = slice(replica * BATCH, (replica + 1) * BATCH)
            # the whole dictionary's selection, as SAELens's trainer counts it
            _close(report["feature_acts"], single["feature_acts"][tokens], f"{where} acts")
            _close(report["sae_out"], single["sae_out"][tokens], f"{where} sae_out")
            _close(report["b_dec"], single["b_dec"], f"{where} b_dec")
            if report["cutoff"] is not None:
                _close(report["cutoff"], single["cutoff"], f"{where} threshold")
            latents = slice(shard * rows, (shard + 1) * rows)
            for name, grad in single["grads"].items():
                dimension = SHARDED_DIMENSIONS.get(name)
                expected = (
                    grad if dimension is None else grad[(slice(None),) * dimension + (latents,)]
                )
                _close(report["grads"][name], expected, f"{where} grad {name}")

        trained = torch.load(tmp_path / f"{variant}-trained.pt")
        for name, value in _single_trained(variant, n_replicas).items():
            _close(trained[name], value, f"{variant} trained {name}")
        saved = SAE.load_from_disk(tmp_path / f"{variant}-saved")
        assert isinstance(saved, MatryoshkaSAE) and saved.cfg.d_sae == D_SAE
        x = next(_batches(1))
        reference = _whole(variant)
        reference.load_state_dict(trained)
        _close(saved(x), to_inference(reference)(x), f"{variant} saved SAE's output")


def _dying_shard(rank: int, folder: Path, world: int) -> None:
    join_gloo(folder / "rendezvous", rank, world)
    mesh = Mesh.of_world(2)
    sae = _shard_of("batchtopk-per-level-aux", mesh)
    cfg = short_run_trainer_config(STEPS, batch_size=BATCH, lr=3e-3, dead_feature_window=2)

    def batches() -> Iterator[torch.Tensor]:
        for step, batch in enumerate(_replica_batches(1, 0)):
            if rank == 1 and step == 3:
                os._exit(3)  # a crash: no cleanup, no goodbye to the other shard
            yield batch

    start = time.monotonic()
    try:
        SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    except CollectiveError as error:
        report = {"message": str(error), "seconds": time.monotonic() - start}
        (folder / "survivor.json").write_text(json.dumps(report))


def test_a_dead_shard_makes_the_other_stop_with_a_clear_error(tmp_path: Path) -> None:
    context = mp.spawn(_dying_shard, args=(tmp_path, 2), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not all(not process.is_alive() for process in context.processes):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the surviving shard hung instead of failing")
        time.sleep(0.2)
    report = json.loads((tmp_path / "survivor.json").read_text())
    assert report["message"].startswith("rank 0 of 2: ")
    assert "Another rank has probably died" in report["message"]
    assert report["seconds"] < 60


def test_what_sharding_cannot_train_is_refused() -> None:
    fields = {"d_in": D_IN, "d_sae": D_SAE, "k": 3, "matryoshka_widths": [6, D_SAE]}
    with pytest.raises(
        ValueError, match="latent sharding trains the sparse path of batchtopk or topk"
    ):
        check_shardable(MatryoshkaTrainingSAEConfig(**fields, training_path="dense"), 2)
    relu = {**fields, "activation": "relu", "k": None}
    with pytest.raises(ValueError, match="activation='relu'"):
        check_shardable(MatryoshkaTrainingSAEConfig(**relu), 2)
    with pytest.raises(ValueError, match="d_sae=48 cannot be split into 5 equal latent shards"):
        check_shardable(MatryoshkaTrainingSAEConfig(**fields), 5)


def test_a_checkpoint_part_resumes_only_the_same_part(tmp_path: Path) -> None:
    part = {"name": "shard-1-of-2", "shard": 1, "n_shards": 2, "latents": [24, 48]}
    (tmp_path / PART_FILE).write_text(json.dumps(part))
    check_part(tmp_path, part)
    with pytest.raises(
        ValueError,
        match=r"holds shard 1 of 2 \(latents \[24, 48\]\), but this "
        r"process trains the whole dictionary",
    ):
        check_part(tmp_path, None)
    other = {**part, "name": "shard-0-of-2", "shard": 0, "latents": [0, 24]}
    with pytest.raises(ValueError, match="but this process trains shard 0 of 2"):
        check_part(tmp_path, other)
    (tmp_path / PART_FILE).unlink()
    with pytest.raises(ValueError, match=r"holds the whole dictionary .* trains shard 0 of 2"):
        check_part(tmp_path, other)
