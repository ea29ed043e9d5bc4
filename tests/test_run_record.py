"""Every Matryoshka run leaves a local record: JSON lines, a loss curve, a printed summary (``run_record``)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.evals import evaluate_levels
from sae_lens_matryoshka.run_record import (
    FIGURE_FILENAME,
    RECORD_FILENAME,
    DeadLatentsWarning,
    mostly_dead,
    read_record,
)
from tests.conftest import D_MODEL

WIDTHS = [8, 24, 64]
STEPS, EVERY = 15, 5


class _Batches:
    """An activation store that hands out given token batches (what ``evaluate_levels`` reads)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = iter(batches)
        self.store_batch_size_prompts = len(batches[0])

    def get_batch_tokens(self, _batch_size: int) -> torch.Tensor:
        return next(self.batches)


def _table(out: str) -> list[list[float]]:
    """The printed summary's rows: width, explained variance, L0, dead latents."""
    lines = out[out.index("width  explained variance") :].splitlines()[1 : 1 + len(WIDTHS)]
    return [[float(cell) for cell in line.split()] for line in lines]


def test_a_run_records_its_steps_draws_its_curve_and_prints_each_level(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Recorded in a temporary folder while it trains, kept beside the saved SAE."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
    (tmp_path / "temporary").mkdir()
    built: list[int] = []
    build = SAETrainer.build_train_step_log_dict
    monkeypatch.setattr(
        SAETrainer,
        "build_train_step_log_dict",
        lambda self, *a, **kw: built.append(self.n_training_steps) or build(self, *a, **kw),
    )
    drawn: list[torch.Tensor] = []
    draw = ActivationsStore.get_batch_tokens
    monkeypatch.setattr(
        ActivationsStore,
        "get_batch_tokens",
        lambda self, *a, **kw: drawn.append(draw(self, *a, **kw)) or drawn[-1],
    )
    cfg = runner_cfg(
        training_tokens=64 * STEPS,
        n_eval_batches=2,
        verbose=True,
        logger=LoggingConfig(log_to_wandb=False, wandb_log_frequency=EVERY),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadLatentsWarning)  # a healthy run: no warning
        LanguageModelSAETrainingRunner(
            cfg, override_dataset=token_dataset, override_model=tiny_model
        ).run()
    output = Path(cfg.output_path)
    assert list((tmp_path / "temporary").iterdir()) == []  # moved beside the SAE

    # one record per logging step, SAELens's own dict, built only on those steps
    entries = read_record(output / RECORD_FILENAME)
    assert [entry["event"] for entry in entries] == ["start", "step", "step", "step", "summary"]
    assert entries[0]["seed"] == cfg.seed and entries[0]["matryoshka_widths"] == WIDTHS
    steps = entries[1:-1]
    assert [entry["step"] for entry in steps] == [4, 9, 14] == built
    for entry in steps:
        assert {
            "losses/overall_loss",
            "losses/mse_loss",
            "metrics/explained_variance",
            "metrics/l0",
            "sparsity/dead_features",
            "details/n_training_samples",
            *(f"metrics/level_{w}/{m}" for w in WIDTHS for m in ("mse", "explained_variance")),
        } <= entry.keys()
        assert entry["metrics/l0"] == pytest.approx(4.0)  # k per token on average
    assert steps[-1]["details/n_training_samples"] == 64 * STEPS

    # the figure: a PNG that decodes
    figure = output / FIGURE_FILENAME
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(figure).shape[:2] > (100, 100)

    # the summary: the levels of the saved SAE on the batches drawn after training,
    # evaluated again here from the saved folder
    saved = SAE.load_from_disk(output)
    again = evaluate_levels(saved, tiny_model, _Batches(drawn[-2:]), 2, compute_ce_loss=False)
    summary = entries[-1]["levels"]
    assert [row["width"] for row in summary] == WIDTHS
    for row, expected in zip(summary, again, strict=True):
        assert row["dead_latents"] == expected["dead_latents"]
        assert row["explained_variance"] == pytest.approx(expected["explained_variance"], abs=1e-5)
        assert row["l0"] == pytest.approx(expected["l0"], abs=1e-5)
    out = capsys.readouterr().out
    assert f"saved to {output.resolve()} ({RECORD_FILENAME} and {FIGURE_FILENAME} beside it)" in out
    printed = _table(out)
    assert [line[0] for line in printed] == WIDTHS
    for line, expected in zip(printed, again, strict=True):
        assert line[1] == pytest.approx(expected["explained_variance"], abs=1e-4)
        assert line[2] == pytest.approx(expected["l0"], abs=1e-2)
        assert line[3] == expected["dead_latents"]
    assert "encoder_weight_grad" in entries[-1]["kernels"]  # what the run computed with


def test_a_mostly_dead_run_is_warned_about_and_recorded_beside_its_checkpoints(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All but two latents can never fire (ReLU, a bias far below any pre-activation)."""
    built: list[int] = []
    build = SAETrainer.build_train_step_log_dict
    monkeypatch.setattr(
        SAETrainer,
        "build_train_step_log_dict",
        lambda self, *a, **kw: built.append(self.n_training_steps) or build(self, *a, **kw),
    )
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_MODEL, d_sae=64, matryoshka_widths=WIDTHS, activation="relu"
    )
    sae = MatryoshkaTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_enc[2:] = -1e4
    cfg = runner_cfg(
        sae_cfg,
        output_path=None,
        checkpoint_path=str(tmp_path / "checkpoints"),
        save_final_checkpoint=True,
        training_tokens=64 * 4,
        n_eval_batches=1,
        logger=LoggingConfig(log_to_wandb=False, wandb_log_frequency=2),
    )
    with pytest.warns(DeadLatentsWarning, match=r"width 8: [678] of 8 .*width 64: 6[234] of 64"):
        LanguageModelSAETrainingRunner(
            cfg, override_dataset=token_dataset, override_model=tiny_model, override_sae=sae
        ).run()
    folder = Path(cfg.checkpoint_path)  # the run's own folder (SAELens appends a run id)
    entries = read_record(folder / RECORD_FILENAME)
    assert built == [1, 3] and [entry["event"] for entry in entries] == [
        "start",
        "step",
        "step",
        "summary",
    ]
    dead = [row["dead_latents"] for row in entries[-1]["levels"]]
    assert dead[0] >= 6 and dead[1:] == [dead[0] + 16, dead[0] + 56]
    assert (folder / FIGURE_FILENAME).exists()


def test_a_run_that_keeps_nothing_writes_nothing_and_computes_no_record(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    built: list[Any] = []
    monkeypatch.setattr(
        SAETrainer, "build_train_step_log_dict", lambda *a, **kw: built.append(a) or {}
    )
    cfg = runner_cfg(
        output_path=None,
        checkpoint_path=None,
        training_tokens=64 * 4,
        n_eval_batches=1,
        verbose=True,
        logger=LoggingConfig(log_to_wandb=False, wandb_log_frequency=1),
    )
    LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    assert built == []  # no logging step was made for a record nobody keeps
    assert list(tmp_path.iterdir()) == []
    assert len(_table(capsys.readouterr().out)) == len(WIDTHS)  # the summary still shows


def test_the_dead_latent_warning_names_the_levels_over_half_dead() -> None:
    rows = [
        {"width": 8, "dead_latents": 4},
        {"width": 24, "dead_latents": 13},
        {"width": 64, "dead_latents": 40},
    ]
    warning = mostly_dead(rows)
    assert warning is not None
    assert "width 24: 13 of 24 (54%); width 64: 40 of 64 (62%)" in warning
    assert "width 8" not in warning  # exactly half is not more than half
    assert mostly_dead(rows[:1]) is None


def test_a_run_that_fails_leaves_its_output_path_alone_and_says_where_its_record_is(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("the final save failed")

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "save_final_sae", fail)
    cfg = runner_cfg(
        output_path=str(tmp_path / "output"),
        training_tokens=64 * 2,
        logger=LoggingConfig(log_to_wandb=False, wandb_log_frequency=1),
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    with (
        pytest.raises(RuntimeError, match="the final save failed"),
        pytest.warns(
            UserWarning, match=r"its training record up to there is in (\S+)\.$"
        ) as caught,
    ):
        runner.run()
    assert not (tmp_path / "output").exists()
    message = str(next(w.message for w in caught if "training record" in str(w.message)))
    entries = read_record(message.rsplit(" ", 1)[-1].rstrip("."))
    assert [entry["event"] for entry in entries] == ["start", "step", "step"]


def test_a_resumed_run_starts_its_record_with_the_steps_its_checkpoint_reached(
    tmp_path: Path,
) -> None:
    from sae_lens_matryoshka.run_record import RunRecord, _carry_over

    run = tmp_path / "checkpoints" / "abc123"
    (run / "640").mkdir(parents=True)
    with RunRecord(run / RECORD_FILENAME, append=False) as earlier:
        earlier.write({"event": "start"})
        for step in range(20):
            earlier.write(
                {"event": "step", "step": step, "details/n_training_samples": 64 * (step + 1)}
            )
    with RunRecord(tmp_path / RECORD_FILENAME, append=False) as resumed:
        _carry_over(resumed, run / "640")
    assert [entry["step"] for entry in read_record(tmp_path / RECORD_FILENAME)] == list(range(10))


def test_record_lines_are_strict_json(tmp_path: Path) -> None:
    from sae_lens_matryoshka.run_record import RunRecord

    with RunRecord(tmp_path / "log.jsonl", append=False) as record:
        record.write({"event": "step", "step": 0, "x": float("nan"), "y": [float("inf"), 1.0]})
    line = (tmp_path / "log.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {
        "event": "step",
        "step": 0,
        "x": None,
        "y": [None, 1.0],
    }
