"""SAEBench's core metrics on a Matryoshka SAE equal those on its portable SAELens form."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("sae_bench")

from datasets import Dataset
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.evals.core.main import run_evals
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE, ActivationsStore, HookedSAETransformer

from sae_lens_matryoshka import MatryoshkaSAE, to_portable

from .conftest import CONTEXT


def _core_metrics(sae: SAE, model: HookedSAETransformer, dataset: Dataset) -> dict[str, Any]:
    """SAEBench's core eval on a fresh activation store drawn with a fixed seed.

    ``load_and_format_sae`` is SAEBench's own route for an SAE object: it copies
    SAELens 6's ``cfg.metadata`` fields onto the config, where its evals read them.
    """
    formatted = load_and_format_sae("custom", sae, "cpu")
    assert formatted is not None
    sae = formatted[1]
    torch.manual_seed(0)
    store = ActivationsStore.from_sae(
        model,
        sae,
        dataset,
        context_size=CONTEXT,
        streaming=False,
        store_batch_size_prompts=4,
        n_batches_in_buffer=2,
        train_batch_size_tokens=64,
    )
    config = CoreEvalConfig(
        model_name="tiny-random",
        batch_size_prompts=4,
        n_eval_reconstruction_batches=3,
        n_eval_sparsity_variance_batches=3,
        context_size=CONTEXT,
        compute_kl=True,
        compute_ce_loss=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
    )
    metrics, feature_metrics = run_evals(sae, store, model, config)
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
