"""Per-level evals on a real model, decoder geometry, and the synthetic absorption metrics by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, to_inference
from sae_lens_matryoshka.evals import (
    add_level_evals,
    evaluate_levels,
    evaluate_levels_on_activations,
    feature_recovery,
    hierarchy_absorption,
    level_max_decoder_cosines,
    mean_max_decoder_cosine,
    plot_level_metrics,
)
from sae_lens_matryoshka.toy import ToyHierarchy

from .conftest import HOOK, hand_built_sae

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_mean_max_decoder_cosine_by_hand() -> None:
    s = 1 / math.sqrt(2)
    # each row's nearest other row is at 45 degrees
    assert mean_max_decoder_cosine(torch.tensor([[1.0, 0.0], [s, s], [0.0, 1.0]])) == pytest.approx(
        s
    )
    # opposite and orthogonal rows: the best other cosine is 0 for every row
    assert mean_max_decoder_cosine(
        torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    ) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 2 latents"):
        mean_max_decoder_cosine(torch.ones(1, 4))


def test_hierarchy_absorption_by_hand() -> None:
    toy = ToyHierarchy(seed=2)
    features, x = toy.sample(5000)
    clean = hierarchy_absorption(
        hand_built_sae(toy, None), features, x, toy.directions, toy.children
    )
    assert clean["absorption"] == 0.0
    assert len(clean["edges"]) == 9
    assert all(
        e["recall_with_child"] == 1.0 and e["recall_without_children"] == 1.0
        for e in clean["edges"]
    )
    # parent 4's latent reads parent - 2 * children: silent exactly when a child fires
    absorbed = hierarchy_absorption(
        hand_built_sae(toy, 4), features, x, toy.directions, toy.children
    )
    for edge in absorbed["edges"]:
        expected_gap = 1.0 if edge["parent"] == 4 else 0.0
        assert edge["gap"] == expected_gap
        assert edge["latent"] == edge["parent"]
    assert absorbed["absorption"] == pytest.approx(3 / 9)


def test_feature_recovery_by_hand() -> None:
    toy = ToyHierarchy(seed=1)
    perfect = feature_recovery(hand_built_sae(toy, None), toy.directions)
    assert perfect["mcc"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["best_cosine"] == pytest.approx([1.0] * toy.n_features, abs=1e-4)
    # swap in a decoder that mixes features 0 and 1 equally: both are matched at cos 1/sqrt(2)
    sae = hand_built_sae(toy, None)
    with torch.no_grad():
        sae.W_dec[0] = toy.directions[0] + toy.directions[1]
        sae.W_dec[1] = toy.directions[0] + toy.directions[1]
    mixed = feature_recovery(sae, toy.directions)
    assert mixed["best_cosine"][0] == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    assert mixed["mcc"] == pytest.approx(
        (toy.n_features - 2 + 2 / math.sqrt(2)) / toy.n_features, abs=1e-4
    )


class ReplayStore:
    """An activation store that hands out the same token batches again after every reset."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.position = 0
        self.context_size = batches[0].shape[1]
        self.store_batch_size_prompts = batches[0].shape[0]

    def get_batch_tokens(self, batch_size: int | None = None) -> torch.Tensor:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        assert batch_size in (None, batch.shape[0])
        return batch

    def reset_input_dataset(self) -> None:
        self.position = 0


def test_every_level_is_evaluated_on_the_same_tokens_as_saelens_would(
    tiny_model, token_dataset, runner_cfg, tmp_path: Path
) -> None:
    runner = LanguageModelSAETrainingRunner(
        runner_cfg(training_tokens=64 * 150),
        override_dataset=token_dataset,
        override_model=tiny_model,
    )
    trained = runner.run()
    tokens = torch.as_tensor(token_dataset["input_ids"][:8]).split(4)
    clean_forwards = []
    run_with_cache = tiny_model.run_with_cache
    tiny_model.run_with_cache = lambda *a, **k: clean_forwards.append(1) or run_with_cache(*a, **k)
    rows = evaluate_levels(trained, tiny_model, ReplayStore(list(tokens)), n_batches=2)
    del tiny_model.run_with_cache
    assert len(clean_forwards) == 2  # the model's clean pass once per batch, not per level
    assert [row["width"] for row in rows] == [8, 24, 64]
    assert len({row["ce_loss_without_sae"] for row in rows}) == 1
    assert rows[-1]["explained_variance"] > rows[0]["explained_variance"]
    assert rows[-1]["mean_max_decoder_cosine"] == pytest.approx(
        mean_max_decoder_cosine(trained.W_dec), rel=1e-6
    )

    config = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        compute_kl=True,
        compute_ce_loss=True,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
        compute_featurewise_density_statistics=True,
    )
    full = to_inference(trained)
    for row in rows:
        level = full.truncate(row["width"])
        metrics, featurewise = run_evals(
            level,
            ReplayStore(list(tokens)),
            tiny_model,
            ActivationScaler(),
            config,
            exclude_special_tokens=False,
        )
        density = torch.tensor(featurewise["feature_density"])
        expected = {
            "explained_variance": metrics["reconstruction_quality"]["explained_variance"],
            "mse": metrics["reconstruction_quality"]["mse"],
            "l0": metrics["sparsity"]["l0"],
            "dead_latents": int((density == 0).sum()),
            "dense_latents": int((density > 0.1).sum()),
            **metrics["model_performance_preservation"],
            "kl_div_score": metrics["model_behavior_preservation"]["kl_div_score"],
            "kl_div_with_sae": metrics["model_behavior_preservation"]["kl_div_with_sae"],
            "mean_max_decoder_cosine": mean_max_decoder_cosine(level.W_dec),
        }
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["width"], name)
    path = plot_level_metrics(rows, tmp_path / "levels.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_decoder_cosines_of_every_level_in_bounded_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blockwise pass equals the full matrix, whatever the block size."""
    W_dec = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True)
    widths = [7, 40, 180, 300]
    expected = []
    for width in widths:
        cosines = unit[:width] @ unit[:width].T
        cosines.fill_diagonal_(-torch.inf)
        expected.append(cosines.max(dim=-1).values.mean().item())
    for block in (300 * 300, 300 * 7, 1):  # one block, several, one row at a time
        monkeypatch.setattr("sae_lens_matryoshka.evals._COSINE_BLOCK", block)
        assert level_max_decoder_cosines(W_dec, widths) == pytest.approx(expected, rel=1e-5)


def test_runner_eval_steps_report_every_level(tiny_model, token_dataset, runner_cfg) -> None:
    runner = LanguageModelSAETrainingRunner(
        runner_cfg(), override_dataset=token_dataset, override_model=tiny_model
    )
    add_level_evals(runner)
    sae: MatryoshkaTrainingSAE = runner.sae
    sae.cfg.metadata.hook_name = HOOK  # set by run() before any eval step
    sae.eval()
    metrics = runner.evaluator(sae, runner.activations_store, ActivationScaler())
    level_keys = {key for key in metrics if key.startswith("levels/")}
    expected = {
        f"levels/{w}/{m}"
        for w in (8, 24, 64)
        for m in ("explained_variance", "l0", "ce_loss_score")
    }
    assert expected <= level_keys
    assert len(metrics) > len(level_keys)  # the runner's own eval metrics are kept


def test_the_saebench_route_names_what_to_install_without_saebench(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SAEBench is no dependency: without it each SAEBench function says how to get it."""
    from sae_lens_matryoshka import evals

    monkeypatch.setitem(sys.modules, "sae_bench", None)  # as if not installed
    calls = {
        "saebench_core": lambda: evals.saebench_core(None, None, None),
        "saebench_core_levels": lambda: evals.saebench_core_levels(None, None, None),
        "saebench_absorption": lambda: evals.saebench_absorption(None, None),
        "saebench_formatted": lambda: evals.saebench_formatted(None),
    }
    for name, call in calls.items():
        with pytest.raises(ImportError, match=r"needs SAEBench .*pip install sae-bench") as raised:
            call()
        assert "environment of its own" in str(raised.value), name


def test_levels_on_activations_alone_equal_a_hand_computation() -> None:
    """What a run from cached activations is summarised by: no model, every level on the batches."""
    torch.manual_seed(0)
    sae = to_inference(
        MatryoshkaTrainingSAE(
            MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=3, matryoshka_widths=[4, 12, 32])
        )
    )
    batches = [torch.randn(20, 8), torch.randn(12, 8)]
    rows = evaluate_levels_on_activations(sae, batches, dense_threshold=0.5)
    x = torch.cat(batches)
    assert [row["width"] for row in rows] == [4, 12, 32]
    for row in rows:
        level = sae.truncate(int(row["width"]))
        acts = level.encode(x)
        x_hat = level.decode(acts)
        explained = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
        density = (acts != 0).float().mean(dim=0)
        assert row["explained_variance"] == pytest.approx(explained.item(), rel=1e-4)
        assert row["mse"] == pytest.approx((x - x_hat).pow(2).sum(dim=-1).mean().item(), rel=1e-5)
        assert row["l0"] == pytest.approx((acts != 0).float().sum(dim=-1).mean().item())
        assert row["dead_latents"] == int((density == 0).sum())
        assert row["dense_latents"] == int((density > 0.5).sum())
    with pytest.raises(ValueError, match="at least one activation batch"):
        evaluate_levels_on_activations(sae, [])
