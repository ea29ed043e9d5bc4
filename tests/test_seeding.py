"""The same runner config and seed train the same weights, bit for bit (``seeding``, ``kernels.measured``)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import LanguageModelSAETrainingRunner
from transformer_lens import HookedTransformer

from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.kernels import measured
from sae_lens_matryoshka.kernels.encoder_backward import ENCODER_WEIGHT_GRAD
from sae_lens_matryoshka.seeding import derived_seed
from tests.conftest import D_MODEL, pin_kernel, tiny_runner_cfg


def _train(model: HookedTransformer, dataset: Dataset, seed: int) -> dict[str, torch.Tensor]:
    """The weights (and buffers) a fresh process would train: no kernel choice carried over."""
    ENCODER_WEIGHT_GRAD.chosen = {}
    # whatever ran before (here: another run) leaves torch's global generator elsewhere
    torch.rand(seed + 3)
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=64,
        k=4,
        matryoshka_widths=[8, 24, 64],
        activation="batchtopk",
        training_path="sparse",
        prefix_sampling="pareto",
        n_sampled_prefixes=4,
    )
    cfg = tiny_runner_cfg(sae_cfg, seed=seed, training_tokens=64 * 12, n_eval_batches=1)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    return {name: tensor.clone() for name, tensor in runner.run().state_dict().items()}


@pytest.mark.filterwarnings("ignore::sae_lens_matryoshka.run_record.DeadLatentsWarning")
def test_the_same_seed_trains_the_same_weights_whatever_the_kernel_timings(
    tiny_model, token_dataset, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Pareto prefixes, BatchTopK on the sparse path, the encoder kernel measured, not pinned.

    Every timing favours the other candidate than the one before, as two close
    candidates on a busy machine do: the first run's choice, kept in the
    cache, is what the second run uses.
    """
    # the encoder's gradient measured; the other kernels keep the suite's pins
    pin_kernel(monkeypatch, "encoder_weight_grad", None)
    monkeypatch.setenv(measured.CACHE_ENV, str(tmp_path / "kernels"))
    favoured = itertools.cycle(["csr", "bagged"])
    timings: list[str] = []

    def alternating(candidate: Any, _args: Any, _device: Any) -> float:
        name = next(n for n, c in ENCODER_WEIGHT_GRAD.candidates.items() if c is candidate)
        if name == "csr":  # one measurement: both candidates timed, the favoured one faster
            timings.append(next(favoured))
        return 1.0 if name == timings[-1] else 2.0

    monkeypatch.setattr(measured, "_time", alternating)
    monkeypatch.setattr(measured, "_ROUNDS", 1)  # one timing per candidate per measurement

    first = _train(tiny_model, token_dataset, seed=7)
    assert timings == ["csr"] and len(list((tmp_path / "kernels").iterdir())) == 1
    second = _train(tiny_model, token_dataset, seed=7)
    assert timings == ["csr"]  # not measured again: the kept choice was used
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    other = _train(tiny_model, token_dataset, seed=8)
    assert not torch.equal(first["W_dec"], other["W_dec"])
    assert not torch.equal(first["W_enc"], other["W_enc"])

    # without the kept choice, the next timing would have picked the other kernel, and
    # the same seed would have trained other weights: what the cache is for
    monkeypatch.setenv(measured.CACHE_ENV, "")
    unkept = _train(tiny_model, token_dataset, seed=7)
    assert timings == ["csr", "bagged"]
    assert not torch.equal(first["W_enc"], unkept["W_enc"])


def test_derived_seeds_are_fixed_and_distinct() -> None:
    assert derived_seed(42, "activation shuffles") == derived_seed(42, "activation shuffles")
    assert derived_seed(42, "activation shuffles") != derived_seed(43, "activation shuffles")
    assert 0 <= derived_seed(-1, "x") < 2**63
