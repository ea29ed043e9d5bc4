"""A diverging run stops with an error, keeps its last checkpoint from before, and saves nothing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.divergence import DivergenceWatch, TrainingDiverged
from sae_lens_matryoshka.io.checkpoints import latest_complete
from sae_lens_matryoshka.toy import ToyHierarchy, short_run_trainer_config

from .conftest import small_sae_cfg, step_output


def test_the_watch_counts_consecutive_steps_above_the_limit() -> None:
    watch = DivergenceWatch(fvu_limit=2.0, patience=3)
    for step, fvu in enumerate([5.0, 5.0, 0.5, 5.0, 5.0]):  # a dip resets the streak
        watch.observe(step, fvu)
    assert watch.suspect and watch.streak == 2 and watch.streak_start == 3
    watch.observe(5, math.nan)  # a batch without variance says nothing
    assert watch.streak == 2
    with pytest.raises(
        TrainingDiverged,
        match=r"step 6: .* is 7, and has been above divergence_fvu=2 "
        r"for 3 consecutive steps since step 3 \(divergence_patience=3\)",
    ):
        watch.observe(6, 7.0)
    off = DivergenceWatch(fvu_limit=2.0, patience=0)
    for step in range(1000):
        off.observe(step, 1e30)
    assert not off.suspect


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("divergence_fvu", 0.5, r"divergence_fvu must be a finite number >= 1.0, got 0.5"),
        ("divergence_fvu", math.inf, r"divergence_fvu must be a finite number"),
        ("divergence_patience", -1, r"divergence_patience must be an integer >= 0, got -1"),
        ("divergence_patience", True, r"divergence_patience must be an integer >= 0, got True"),
    ],
)
def test_bad_watch_settings_are_refused(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        MatryoshkaTrainingSAEConfig(
            d_in=8, d_sae=16, k=2, matryoshka_widths=[4, 16], **{field: value}
        )


def test_the_step_reports_its_fvu_and_the_watch_stops_a_poisoned_sae() -> None:
    """The FVU comes with the step's one host read: a decoder blown up 1e6x is caught in `patience` steps."""
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32], divergence_patience=3
    )
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(cfg)
    x = torch.randn(64, 8)
    step_output(sae, x, step=0)
    assert not sae.divergence.suspect  # a fresh SAE is near the mean's reconstruction
    with torch.no_grad():
        sae.W_dec.mul_(1e6)
    step_output(sae, x, step=1)
    step_output(sae, x, step=2)
    assert sae.divergence.suspect
    with pytest.raises(TrainingDiverged, match=r"Training step 3: the run is diverging"):
        step_output(sae, x, step=3)
    sae.eval()
    step_output(sae, x, step=4)  # eval-mode passes (evals during training) are not watched


def test_a_diverging_runner_run_stops_writes_no_checkpoint_during_it_and_saves_nothing(
    tmp_path: Path, tiny_model: Any, token_dataset: Any, runner_cfg: Any
) -> None:
    """SAELens's runner at lr 1e4 (MSE 5e31, exit 0 before): the error, no checkpoint since, no SAE.

    It diverges from its first steps, so the checkpoint due at step 50 falls
    inside the streak and is skipped with a warning; the error comes at the
    patience's end, and the final SAE is not written.
    """
    cfg = runner_cfg(
        small_sae_cfg(),
        lr=1e4,
        training_tokens=64 * 400,
        checkpoint_path=str(tmp_path / "ckpt"),
        n_checkpoints=8,
    )
    cfg.sae.divergence_patience = 80
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TrainingDiverged, match=r"Training step \d+: the run is diverging"):
            runner.run()
    skipped = [str(w.message) for w in caught if "not written: since step" in str(w.message)]
    assert len(skipped) == 1, skipped
    checkpoints = Path(cfg.checkpoint_path)
    assert not checkpoints.exists() or latest_complete(checkpoints) is None
    assert not Path(cfg.output_path).exists()  # nothing saved as if it had succeeded


class RecordingWatch(DivergenceWatch):
    """The watch, remembering every FVU it saw."""

    def __init__(self, fvu_limit: float, patience: int) -> None:
        super().__init__(fvu_limit, patience)
        self.seen: list[float] = []

    def observe(self, step: int, fvu: float) -> None:
        self.seen.append(fvu)
        super().observe(step, fvu)


@pytest.mark.parametrize(
    "fields",
    [
        {"activation": "relu", "l1_coefficient": 0.1, "l1_warm_up_steps": 50},
        {"activation": "batchtopk", "k": 3},
    ],
)
def test_the_watch_never_fires_on_sound_runs(fields: dict[str, Any]) -> None:
    """The toy's runs, with an L1 warm-up or BatchTopK, stay far below the limit from the start."""
    toy = ToyHierarchy(seed=1)
    d_in = toy.directions.shape[1]
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=d_in, d_sae=40, matryoshka_widths=[3, 40], divergence_patience=1, **fields
    )
    torch.manual_seed(1)
    sae = MatryoshkaTrainingSAE(cfg)
    sae.divergence = watch = RecordingWatch(cfg.divergence_fvu, cfg.divergence_patience)
    batches = iter(lambda: toy.sample(256)[1], None)
    trainer_cfg = short_run_trainer_config(300, batch_size=256, lr=3e-3, dead_feature_window=50)
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches).fit()
    assert len(watch.seen) == 300
    assert max(watch.seen) < 1.5 and watch.seen[-1] < 0.5, (watch.seen[:3], watch.seen[-1])
