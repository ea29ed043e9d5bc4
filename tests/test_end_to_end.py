"""End to end through SAELens's own runner on a real (tiny, random) TransformerLens model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
)
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import HOOK, step_output


def _hook_activations(model, dataset) -> torch.Tensor:
    tokens = torch.as_tensor(dataset["input_ids"][:8])
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK].reshape(-1, cache[HOOK].shape[-1])


def test_runner_trains_saves_and_loads_back(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path
) -> None:
    cfg = runner_cfg(checkpoint_path=str(tmp_path / "checkpoints"), n_checkpoints=1)
    sae = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    assert isinstance(sae, MatryoshkaTrainingSAE)

    output = Path(cfg.output_path)
    assert {p.name for p in output.iterdir()} >= {
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "runner_cfg.json",
    }
    saved_cfg = json.loads((output / "cfg.json").read_text())
    assert saved_cfg["architecture"] == "matryoshka"
    assert saved_cfg["activation"] == "jumprelu"
    assert saved_cfg["matryoshka_widths"] == [8, 24, 64]
    assert saved_cfg["metadata"]["hook_name"] == HOOK
    assert saved_cfg["metadata"]["training_architecture_details"]["activation"] == "batchtopk"
    runner_saved = json.loads((output / "runner_cfg.json").read_text())
    assert runner_saved["sae"]["architecture"] == "matryoshka"

    loaded = SAE.load_from_disk(output)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.matryoshka_widths == [8, 24, 64]
    acts = _hook_activations(tiny_model, token_dataset)
    sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(acts), sae.encode(acts), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(acts), sae(acts), rtol=1e-4, atol=1e-5)
        l0 = (loaded.encode(acts) > 0).float().sum(-1).mean()
    assert 0 < l0 < 64

    checkpoints = [p for p in Path(cfg.checkpoint_path).iterdir() if p.is_dir()]
    assert len(checkpoints) == 1
    restored = MatryoshkaTrainingSAE.load_from_disk(checkpoints[0])
    assert restored.matryoshka_widths == [8, 24, 64]
    assert restored.activation_fn.topk_threshold.item() > 0


def test_training_improves_every_level(tiny_model, token_dataset, runner_cfg) -> None:
    acts = _hook_activations(tiny_model, token_dataset)
    cfg = runner_cfg(training_tokens=64 * 150)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    with torch.no_grad():
        runner.sae.train()
        before = _level_mse(runner.sae, acts)
    sae = runner.run()
    with torch.no_grad():
        sae.train()
        after = _level_mse(sae, acts)
    assert (after < 0.8 * before).all(), (before, after)
    assert after[-1] < 0.4 * before[-1], (before, after)
    # nested prefixes: each larger level reconstructs at least as well as the smaller ones
    assert (after[1:] <= after[:-1] + 1e-6).all(), after


def _level_mse(sae: MatryoshkaTrainingSAE, acts: torch.Tensor) -> torch.Tensor:
    levels = sae.decode_levels(sae.encode(acts))
    return (levels - acts).pow(2).sum(-1).mean(-1)


def test_runner_config_from_dict_trains(tiny_model, token_dataset, runner_cfg) -> None:
    as_dict = runner_cfg().to_dict()
    as_dict["sae"] = {
        "architecture": "matryoshka",
        "d_in": 16,
        "d_sae": 32,
        "k": 2,
        "matryoshka_widths": [4, 16, 32],
        "use_matryoshka_aux_loss": True,
    }
    cfg = LanguageModelSAERunnerConfig.from_dict(json.loads(json.dumps(as_dict)))
    sae = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    assert isinstance(sae, MatryoshkaTrainingSAE)
    assert sae.cfg.use_matryoshka_aux_loss
    assert isinstance(SAE.load_from_disk(cfg.output_path), MatryoshkaSAE)


def _trainer(sae: MatryoshkaTrainingSAE, batches, steps: int) -> SAETrainer:
    cfg = short_run_trainer_config(steps, batch_size=32, lr=1e-3, dead_feature_window=1000)
    return SAETrainer(cfg=cfg, sae=sae, data_provider=batches)


def test_per_level_metrics_reach_saelens_log_dict() -> None:
    """What SAELens sends to wandb each logging step holds every level's MSE and explained variance."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 12, 32])
    )
    x = torch.randn(32, 8) * 3 + 1
    trainer = _trainer(sae, iter([x]), steps=1)
    output = step_output(sae, x)
    assert output.feature_acts.is_sparse  # SAELens's statistics take the sparse activations
    log = trainer.build_train_step_log_dict(output, n_training_samples=32)
    assert log["metrics/l0"] == pytest.approx(2.0)  # BatchTopK keeps k * n_tokens entries

    levels = sae.decode_levels(output.feature_acts).detach()
    total_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    for level, width in enumerate([4, 12, 32]):
        mse = (levels[level] - x).pow(2).sum(-1).mean()
        assert log[f"metrics/level_{width}/mse"] == pytest.approx(mse.item(), rel=1e-5)
        assert log[f"metrics/level_{width}/explained_variance"] == pytest.approx(
            1 - (mse / total_variance).item(), rel=1e-5
        )
    assert log["losses/inner_mse_loss_4"] == pytest.approx(log["metrics/level_4/mse"], rel=1e-6)
    assert log["losses/mse_loss"] == pytest.approx(log["metrics/level_32/mse"], rel=1e-6)
    assert log["metrics/explained_variance"] == pytest.approx(
        log["metrics/level_32/explained_variance"], rel=1e-5
    )
    assert log["losses/overall_loss"] == pytest.approx(
        sum(v for k, v in log.items() if k.startswith("losses/") and k != "losses/overall_loss"),
        rel=1e-5,
    )


def test_progress_bar_counts_steps_and_shows_the_loss(capsys) -> None:
    """The bar counts steps under a short label, the overall loss as its postfix (every level's
    loss is in the step's log, ``test_per_level_metrics_reach_saelens_log_dict``)."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 12, 32])
    )
    # the loss is refreshed every 100 steps, as SAELens refreshes its description
    _trainer(sae, iter([torch.randn(32, 8) for _ in range(100)]), steps=100).fit()
    err = capsys.readouterr().err
    assert "Training Matryoshka SAE: 100%" in err and "100/100" in err
    assert "loss=" in err and "mse_loss" not in err


@pytest.mark.parametrize(
    "fields",
    [
        {"activation": "topk", "k": 4},
        {"activation": "jumprelu", "l0_coefficient": 0.01, "use_matryoshka_aux_loss": True},
        {
            "activation": "relu",
            "l1_coefficient": 0.01,
            "prefix_sampling": "pareto",
            "matryoshka_widths": [],
        },
        {
            "activation": "batchtopk",
            "k": 4,
            "detach_between_levels": True,
            "level_weights": [2.0, 1.0, 1.0],
        },
    ],
    ids=["topk", "jumprelu", "relu-pareto", "batchtopk-detach-weights"],
)
def test_every_variant_trains_through_the_runner(
    fields, tiny_model, token_dataset, runner_cfg
) -> None:
    sae_fields = {"d_in": 16, "d_sae": 64, "matryoshka_widths": [8, 24, 64], **fields}
    cfg = runner_cfg(sae=MatryoshkaTrainingSAEConfig(**sae_fields), training_tokens=64 * 100)
    sae = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    loaded = SAE.load_from_disk(cfg.output_path)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.matryoshka_widths == sae.matryoshka_widths
    acts = _hook_activations(tiny_model, token_dataset)
    sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(acts), sae(acts), rtol=1e-4, atol=1e-5)
        explained = (
            1
            - (loaded(acts) - acts).pow(2).sum(-1).mean()
            / (acts - acts.mean(0)).pow(2).sum(-1).mean()
        )
    assert explained > 0.3, explained


def test_non_finite_activations_stop_training_before_any_update(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path
) -> None:
    """A NaN batch mid-run raises, names the step and the count, and leaves checkpoints loadable."""
    calls = {"n": 0}

    def poison(activations, hook):
        calls["n"] += 1
        if calls["n"] > 90:  # after the first checkpoint (step 50), poison 3 positions per batch
            activations = activations.clone()
            activations[0, :3, 0] = float("nan")
        return activations

    tiny_model.add_hook(HOOK, poison)
    cfg = runner_cfg(
        checkpoint_path=str(tmp_path / "ckpt"), n_checkpoints=3, training_tokens=64 * 200
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    )
    with pytest.raises(
        FloatingPointError, match=r"Training step \d+: the activation batch holds \d+ non-finite"
    ):
        runner.run()
    assert torch.isfinite(runner.sae.W_enc).all() and torch.isfinite(runner.sae.W_dec).all()
    checkpoints = [p for p in Path(cfg.checkpoint_path).iterdir() if p.is_dir()]
    assert checkpoints, "the run should have checkpointed before the NaN batch"
    for checkpoint in checkpoints:
        restored = MatryoshkaTrainingSAE.load_from_disk(checkpoint)
        assert torch.isfinite(restored.W_dec).all()


def test_non_finite_batch_is_reported_exactly() -> None:
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=2, matryoshka_widths=[4, 32])
    )
    x = torch.randn(10, 8)
    x[2, 3], x[5, 0] = float("nan"), float("inf")
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    with pytest.raises(
        FloatingPointError,
        match=r"Training step 7: the activation batch holds 2 non-finite values \(NaN/Inf\) out of 80",
    ):
        step_output(sae, x, logging=False, step=7)
    for name, param in sae.named_parameters():
        assert torch.equal(param, before[name])
    assert sae.activation_fn.last_cutoff.item() == -1.0  # nor learned from the bad batch
