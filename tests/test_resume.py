"""Interrupted training resumes bit for bit: levels, thresholds, dead-latent statistics,
prefix-sampler state, coefficient and learning-rate schedules, Adam's state, the
latent ordering's counts and the step count.

A run through SAELens's own ``SAETrainer`` writes its periodic checkpoints and
then dies (its data source fails mid-run). A fresh SAE and trainer resume from
the last checkpoint with the calls SAELens's runner makes for
``resume_from_checkpoint`` and must end with the weights of an uninterrupted
run, bit for bit. SAELens's activation store does not checkpoint its shuffle buffer, so the
test feeds the trainer batches indexed by sample count, as a deterministic
activation source would. A checkpoint whose bytes changed after it was
written is refused (its SHA-256 digests), each file hashed once per resume.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.io import checkpoints as checkpoint_files
from sae_lens_matryoshka.io.checkpoints import ChangedCheckpointError
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import flip_bytes, record_hashed_files

D_IN, D_SAE, BATCH, STEPS, CRASH_AT = 10, 48, 32, 40, 33


class DataSourceDied(RuntimeError):
    """What the interrupted run dies of."""


def _batches(start_sample: int, crash_at: int | None = None) -> Iterator[torch.Tensor]:
    """Batch ``i`` depends only on ``i``, so a resumed run can pick up where it left off."""
    generator = torch.Generator().manual_seed(7)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    step = start_sample // BATCH
    while True:
        if step == crash_at:
            raise DataSourceDied(f"activation source lost at step {step}")
        batch_rng = torch.Generator().manual_seed(1000 + step)
        codes = torch.rand(BATCH, D_SAE, generator=batch_rng) < 0.06
        yield codes.float() @ directions + 0.05 * torch.randn(BATCH, D_IN, generator=batch_rng)
        step += 1


VARIANTS: dict[str, dict[str, Any]] = {
    "batchtopk-fixed-aux": {"activation": "batchtopk", "k": 3, "use_matryoshka_aux_loss": True},
    "topk": {"activation": "topk", "k": 3},
    "jumprelu-pareto-warmup": {
        "activation": "jumprelu",
        "prefix_sampling": "pareto",
        "n_sampled_prefixes": 5,
        "l0_coefficient": 0.02,
        "l0_warm_up_steps": 20,
    },
    # latents ordered every 7 steps: the crash falls between two orderings, whose
    # counts so far the checkpoint carries
    "batchtopk-ordered": {"activation": "batchtopk", "k": 3, "order_latents_every": 7},
}


def _sae(variant: str, seed: int) -> MatryoshkaTrainingSAE:
    torch.manual_seed(seed)
    fields = {"d_in": D_IN, "d_sae": D_SAE, **VARIANTS[variant]}
    if fields.get("prefix_sampling") != "pareto":
        fields["matryoshka_widths"] = [6, 18, D_SAE]
    return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**fields))


def _trainer(
    sae: MatryoshkaTrainingSAE, data: Iterator[torch.Tensor], checkpoints: Path | None
) -> SAETrainer:
    cfg = dataclasses.replace(
        short_run_trainer_config(STEPS, batch_size=BATCH, lr=3e-3, dead_feature_window=4),
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=5,
        lr_end=3e-4,
        lr_decay_steps=STEPS - 5,
        n_checkpoints=3 if checkpoints is not None else 0,
        checkpoint_path=None if checkpoints is None else str(checkpoints),
    )
    return SAETrainer(cfg=cfg, sae=sae, data_provider=data)


def _latest(checkpoints: Path) -> Path:
    """The checkpoint with the most samples (the runner nests them under a run id)."""
    folders = [path.parent for path in checkpoints.rglob("sae_weights.safetensors")]
    return max(folders, key=lambda path: int(path.name))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    variant: str, tmp_path: Path
) -> None:
    uninterrupted = _trainer(_sae(variant, seed=0), _batches(0), None)
    uninterrupted.fit()

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(DataSourceDied):
        _trainer(_sae(variant, seed=0), _batches(0, crash_at=CRASH_AT), checkpoints).fit()
    checkpoint = _latest(checkpoints)
    assert 0 < int(checkpoint.name) < CRASH_AT * BATCH

    # a new process: different initial weights, everything restored from the checkpoint
    resumed_sae = _sae(variant, seed=123)
    trainer = _trainer(resumed_sae, _batches(int(checkpoint.name)), None)
    trainer.load_trainer_state(checkpoint)
    resumed_sae.load_weights_from_checkpoint(checkpoint)
    trainer.fit()

    final = uninterrupted.sae.state_dict()
    for name, value in resumed_sae.state_dict().items():
        assert torch.equal(value, final[name]), name
    if "prefix_rng_state" in final:
        assert torch.equal(resumed_sae.levels.prefix_rng_state, final["prefix_rng_state"])
    torch.testing.assert_close(
        trainer.n_forward_passes_since_fired, uninterrupted.n_forward_passes_since_fired
    )
    # SAELens's own resume would end a step short (it saves the count before the step)
    assert trainer.n_training_steps == uninterrupted.n_training_steps == STEPS
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        uninterrupted.optimizer.param_groups[0]["lr"]
    )


def test_the_runner_restores_every_piece_of_matryoshka_state(
    runner_cfg: Callable[..., Any], tiny_model: Any, token_dataset: Any, tmp_path: Path
) -> None:
    """``resume_from_checkpoint`` with nothing left to train returns the checkpoint itself."""
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=16,
        d_sae=64,
        k=4,
        prefix_sampling="pareto",
        n_sampled_prefixes=4,
        prefix_sampling_seed=5,
    )
    checkpoints = tmp_path / "checkpoints"
    first = runner_cfg(sae=sae_cfg, checkpoint_path=str(checkpoints), n_checkpoints=1)
    LanguageModelSAETrainingRunner(
        first, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    checkpoint = _latest(checkpoints)
    saved = load_file(checkpoint / "sae_weights.safetensors")
    assert float(saved["topk_threshold"]) > 0  # state worth restoring

    resumed_cfg = runner_cfg(
        sae=sae_cfg,
        training_tokens=int(checkpoint.name),
        resume_from_checkpoint=str(checkpoint),
        output_path=str(tmp_path / "resumed"),
    )
    torch.manual_seed(1234)  # a fresh SAE unlike the first: only the checkpoint can match it
    runner = LanguageModelSAETrainingRunner(
        resumed_cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    resumed = runner.run()
    state = resumed.state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name].to(value.dtype), value), name


def test_the_runner_refuses_to_resume_from_a_checkpoint_changed_after_writing(
    runner_cfg: Callable[..., Any], tiny_model: Any, token_dataset: Any, tmp_path: Path
) -> None:
    """Bytes flipped in the weights (size unchanged) used to resume silently."""
    checkpoints = tmp_path / "checkpoints"
    first = runner_cfg(checkpoint_path=str(checkpoints), n_checkpoints=1, training_tokens=64 * 4)
    LanguageModelSAETrainingRunner(
        first, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    checkpoint = _latest(checkpoints)
    flip_bytes(checkpoint / "sae_weights.safetensors")  # trainer_state.pt: test_checkpoints.py
    resumed_cfg = runner_cfg(
        training_tokens=int(checkpoint.name) + 64, resume_from_checkpoint=str(checkpoint)
    )
    runner = LanguageModelSAETrainingRunner(
        resumed_cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    changed = f"{checkpoint} changed after it was written: sae_weights.safetensors's sha256"
    with pytest.raises(ChangedCheckpointError, match=re.escape(changed)):
        runner.run()


def test_resuming_hashes_each_file_of_the_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAELens reads the trainer state, then the weights: both check the folder, one hashes it."""
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(DataSourceDied):
        _trainer(_sae("topk", seed=0), _batches(0, crash_at=CRASH_AT), checkpoints).fit()
    checkpoint = _latest(checkpoints)
    # as for a checkpoint written more than _RACY_NS ago (this one is seconds old)
    monkeypatch.setattr(checkpoint_files, "_RACY_NS", -(10**15))
    hashed = record_hashed_files(monkeypatch)
    resumed_sae = _sae("topk", seed=123)
    trainer = _trainer(resumed_sae, _batches(int(checkpoint.name)), None)
    trainer.load_trainer_state(checkpoint)
    resumed_sae.load_weights_from_checkpoint(checkpoint)
    written = sorted(
        path.name for path in checkpoint.iterdir() if path.name != "checkpoint_complete.json"
    )
    assert sorted(path.name for path in hashed) == written
