"""SAEBench's core metrics on a Matryoshka SAE: as SAEBench computes them, level by level.

- equal to those on its portable SAELens form;
- ``saebench_core_levels``'s table: each row equal to SAEBench's own core eval
  of that level's ``sae.truncate(width)`` on a fresh store (the oracle), and,
  where the two define a metric the same way, to the plugin's ``evaluate_levels``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sae_bench")

from datasets import Dataset
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import calculate_misc_metrics, run_evals
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE, ActivationsStore, HookedSAETransformer

from sae_lens_matryoshka import MatryoshkaSAE, to_portable
from sae_lens_matryoshka.evals import evaluate_levels, saebench_core, saebench_core_levels

from .conftest import CONTEXT, WIDTHS

N_BATCHES, BATCH_PROMPTS = 3, 4


def _store(sae: SAE, model: HookedSAETransformer, dataset: Dataset) -> ActivationsStore:
    """A fresh activation store over ``dataset``: every one built here yields the same batches."""
    torch.manual_seed(0)
    return ActivationsStore.from_sae(
        model,
        sae,
        dataset,
        context_size=CONTEXT,
        streaming=False,
        store_batch_size_prompts=BATCH_PROMPTS,
        n_batches_in_buffer=2,
        train_batch_size_tokens=64,
    )


def _config() -> CoreEvalConfig:
    return CoreEvalConfig(
        model_name="tiny-random",
        batch_size_prompts=BATCH_PROMPTS,
        n_eval_reconstruction_batches=N_BATCHES,
        n_eval_sparsity_variance_batches=N_BATCHES,
        context_size=CONTEXT,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )


def _core_metrics(sae: SAE, model: HookedSAETransformer, dataset: Dataset) -> dict[str, Any]:
    """SAEBench's core eval on a fresh activation store, called as SAEBench's docs show.

    ``load_and_format_sae`` is SAEBench's own route for an SAE object: it copies
    SAELens 6's ``cfg.metadata`` fields onto the config, where its evals read them.
    """
    formatted = load_and_format_sae("custom", sae, "cpu")
    assert formatted is not None
    sae = formatted[1]
    metrics, feature_metrics = run_evals(sae, _store(sae, model, dataset), model, _config())
    return {"metrics": metrics, "feature_metrics": feature_metrics}


def _flat(tree: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        return {
            k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}/").items()
        }
    if isinstance(tree, torch.Tensor):
        return {f"{prefix}[{i}]": float(v) for i, v in enumerate(tree.flatten().tolist())}
    if isinstance(tree, (list, tuple)):
        return {f"{prefix}[{i}]": float(v) for i, v in enumerate(tree)}
    return {prefix.rstrip("/"): float(tree)}


def test_core_eval_equals_the_portable_forms(
    sae: MatryoshkaSAE, model: HookedSAETransformer, token_dataset: Dataset
) -> None:
    portable = to_portable(sae)
    ours = _flat(_core_metrics(sae, model, token_dataset))
    theirs = _flat(_core_metrics(portable, model, token_dataset))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert math.isclose(value, theirs[name], rel_tol=1e-4, abs_tol=1e-5) or (
            math.isnan(value) and math.isnan(theirs[name])
        ), (name, value, theirs[name])
    # the eval measured something: the trained SAE reconstructs and fires sparsely
    explained = ours["metrics/reconstruction_quality/explained_variance"]
    l0 = ours["metrics/sparsity/l0"]
    assert 0.3 < explained <= 1.0, explained
    assert 0 < l0 < sae.cfg.d_sae, l0


def test_the_level_table_equals_saebench_on_each_truncated_level(
    sae: MatryoshkaSAE, model: HookedSAETransformer, token_dataset: Dataset
) -> None:
    """The oracle: SAEBench's own core eval of ``sae.truncate(24)``, run separately."""
    rows = saebench_core_levels(sae, model, _store(sae, model, token_dataset), _config())
    assert [row["width"] for row in rows] == WIDTHS
    level = WIDTHS.index(24)
    oracle = _core_metrics(sae.truncate(24), model, token_dataset)
    expected = {
        name: float(value) for group in oracle["metrics"].values() for name, value in group.items()
    } | calculate_misc_metrics(oracle["feature_metrics"])
    assert rows[level].keys() == {"width"} | expected.keys()
    for name, value in expected.items():
        assert math.isclose(rows[level][name], value, rel_tol=1e-6, abs_tol=1e-7), name
    # SAEBench's metrics, as it reports them
    for name in ("explained_variance", "mse", "l0", "ce_loss_score", "kl_div_score", "frac_alive"):
        assert name in rows[level]
    # every level read the same tokens: a prefix's latents fire where the whole SAE's do
    l0 = [row["l0"] for row in rows]
    assert l0 == sorted(l0) and l0[0] < l0[-1], l0
    assert len({row["ce_loss_without_sae"] for row in rows}) == 1
    assert len({row["kl_div_with_ablation"] for row in rows}) == 1
    # and the SAE given was left as it was
    assert "hook_layer" not in sae.cfg.metadata and not hasattr(sae.cfg, "hook_layer")


def test_one_saebench_row_for_the_whole_sae_equals_its_core_eval(
    sae: MatryoshkaSAE, sae_folder: Path, model: HookedSAETransformer, token_dataset: Dataset
) -> None:
    row = saebench_core(sae, model, _store(sae, model, token_dataset), _config())
    oracle = _core_metrics(SAE.load_from_disk(sae_folder), model, token_dataset)
    for group in oracle["metrics"].values():
        for name, value in group.items():
            assert math.isclose(row[name], float(value), rel_tol=1e-6, abs_tol=1e-7), name


class _FixedTokens:
    """A store serving fixed token batches, rewound by ``reset_input_dataset``.

    SAEBench's core eval reads the store twice (CE/KL, then reconstruction and
    sparsity) and rewinds it in between with ``reset_input_dataset``, which
    SAELens 6.54's store ignores; this one obeys, so both of SAEBench's passes
    and ``evaluate_levels`` read the very same tokens.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        self.batches = list(tokens[: N_BATCHES * BATCH_PROMPTS].split(BATCH_PROMPTS))
        self.position = 0
        self.store_batch_size_prompts = BATCH_PROMPTS
        self.context_size = CONTEXT

    def get_batch_tokens(self, batch_size: int | None = None, **_: Any) -> torch.Tensor:
        assert batch_size in (None, BATCH_PROMPTS)
        batch = self.batches[self.position % N_BATCHES]
        self.position += 1
        return batch

    def reset_input_dataset(self) -> None:
        self.position = 0


def test_the_level_table_agrees_with_evaluate_levels_where_definitions_coincide(
    sae: MatryoshkaSAE, model: HookedSAETransformer, tokens: torch.Tensor
) -> None:
    """Comparable: L0, CE and KL, MSE up to SAEBench's scale, dead latents, decoder cosines.

    Not comparable: explained variance. SAELens's (and ``evaluate_levels``'s) is
    ``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)``; SAEBench 0.6.0 subtracts
    the square of the mean of ``x**2`` over tokens and dimensions instead of
    ``||E x||^2``.
    """
    ours = saebench_core_levels(sae, model, _FixedTokens(tokens), _config())
    plugin = evaluate_levels(sae, model, _FixedTokens(tokens), n_batches=N_BATCHES)
    tokens_per_batch = BATCH_PROMPTS * CONTEXT
    for row, level in zip(ours, plugin, strict=True):
        assert row["width"] == level["width"]
        assert row["l0"] == pytest.approx(level["l0"], rel=1e-6)
        for name in ("ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae"):
            assert row[name] == pytest.approx(level[name], rel=1e-5), name
        assert row["ce_loss_with_ablation"] == pytest.approx(
            level["ce_loss_with_ablation"], rel=1e-5
        )
        # SAEBench takes log(softmax), SAELens log_softmax: equal up to rounding
        assert row["kl_div_with_sae"] == pytest.approx(level["kl_div_with_sae"], rel=1e-4)
        assert row["kl_div_score"] == pytest.approx(level["kl_div_score"], rel=1e-4)
        # SAEBench's mse divides each token's squared error by the tokens in its batch
        assert row["mse"] * tokens_per_batch == pytest.approx(level["mse"], rel=1e-5)
        assert round(row["frac_alive"] * row["width"]) == row["width"] - level["dead_latents"]
        assert row["average_max_decoder_cosine_sim"] == pytest.approx(
            level["mean_max_decoder_cosine"], rel=1e-5
        )
