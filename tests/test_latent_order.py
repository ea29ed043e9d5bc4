"""Latent ordering by firing frequency (``order_latents_every``, ``latent_order``)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.collectives import SINGLE_PROCESS
from sae_lens_matryoshka.io.loaders import to_inference
from sae_lens_matryoshka.latent_order import (
    TRAINER_ATTRIBUTE,
    FrequencyWindow,
    TrainerOrdering,
    order_latents,
    ordering_bounds,
)
from sae_lens_matryoshka.latent_part import LatentPart
from sae_lens_matryoshka.toy import short_run_trainer_config
from sae_lens_matryoshka.toy.model import single_thread

from .conftest import D_MODEL, quick_train, tiny_runner_cfg

D_IN, D_SAE, BATCH = 8, 32, 32
WIDTHS = [4, 12, 32]
#: the per-latent parameters and the dimension that runs over latents
LATENT_DIMENSIONS = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "activation_fn.threshold": 0}


def _cfg(**fields: Any) -> MatryoshkaTrainingSAEConfig:
    base: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "matryoshka_widths": WIDTHS,
        "activation": "batchtopk",
        "k": 3,
        # float64: a permutation changes the order of some sums (a token's active
        # latents in decoding, the gradient norm that clipping takes), so the runs
        # differ by roundings: about 6e-8 in float32 after these runs (within
        # assert_close's float32 tolerance), but there a near-tie at BatchTopK's
        # cut-off could flip a selection; in float64 they are about 1e-16 (1e-10
        # with JumpReLU, whose thresholds stay float32 whatever the SAE's dtype)
        "dtype": "float64",
    }
    return MatryoshkaTrainingSAEConfig(**(base | fields))


def _batches(steps: int) -> list[torch.Tensor]:
    """Inputs whose coordinates have very different scales, so latents fire at different rates."""
    generator = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -1.5, D_IN, dtype=torch.float64)
    return [
        torch.randn(BATCH, D_IN, generator=generator, dtype=torch.float64) * scales
        for _ in range(steps)
    ]


@single_thread()
def _train(cfg: MatryoshkaTrainingSAEConfig, steps: int, window: int | None = None) -> SAETrainer:
    """SAELens's trainer, ``steps`` steps from seed 0 on :func:`_batches` (the same for every run)."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(cfg)
    trainer_cfg = short_run_trainer_config(steps, BATCH, lr=1e-2, dead_feature_window=3)
    if window is not None:
        trainer_cfg = dataclasses.replace(trainer_cfg, feature_sampling_window=window)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(_batches(steps)))
    trainer.fit()
    return trainer


def _assert_blockwise_non_increasing(values: torch.Tensor, bounds: list[int]) -> None:
    start = 0
    for stop in bounds:
        block = values[start:stop]
        assert bool((block[:-1] >= block[1:]).all()), (start, stop, block)
        start = stop


RUNS = {
    # fixed widths: each group ordered on its own
    "fixed-batchtopk": ({}, 13, 5),
    # dense path; JumpReLU's thresholds (a parameter, with Adam state) travel too
    "fixed-jumprelu": (
        {"activation": "jumprelu", "k": None, "l0_coefficient": 0.05, "normalize_decoder": True},
        12,
        None,
    ),
    # sampled prefixes: one global order; with the full width alone the loss
    # does not depend on positions, so the two runs can be compared exactly
    "pareto-global": ({"prefix_sampling": "pareto", "n_sampled_prefixes": 1}, 12, None),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_an_ordered_run_is_the_unordered_run_permuted(run: str) -> None:
    fields, steps, window = RUNS[run]
    every = 4
    reference = _train(_cfg(**fields), steps, window)
    ordered = _train(_cfg(**fields, order_latents_every=every), steps, window)

    ordering = getattr(ordered, TRAINER_ATTRIBUTE)
    assert getattr(reference, TRAINER_ATTRIBUTE, None) is None
    # every `every` steps, and once more after the last step if it ends no interval
    assert ordering.n_orderings == steps // every + (steps % every != 0)
    perm = ordering.permutation
    assert not torch.equal(perm, torch.arange(D_SAE)), "the test should move latents"
    bounds = ordering_bounds(ordered.sae.cfg)
    start = 0
    for stop in bounds:  # nobody left their block
        assert sorted(perm[start:stop].tolist()) == list(range(start, stop))
        start = stop
    if run.startswith("fixed"):
        assert bounds == WIDTHS
        assert not torch.equal(perm[WIDTHS[0] : WIDTHS[1]], torch.arange(WIDTHS[0], WIDTHS[1]))
    else:
        assert bounds == [D_SAE]

    reference_parameters = dict(reference.sae.named_parameters())
    ordered_parameters = dict(ordered.sae.named_parameters())
    assert reference_parameters.keys() == ordered_parameters.keys()
    for name, parameter in reference_parameters.items():
        moved = ordered_parameters[name]
        dimension = LATENT_DIMENSIONS.get(name)
        expected = parameter if dimension is None else parameter.index_select(dimension, perm)
        torch.testing.assert_close(moved, expected, msg=name)
        # Adam's per-latent state moved with it
        for key in ("exp_avg", "exp_avg_sq"):
            state = reference.optimizer.state[parameter][key]
            expected = state if dimension is None else state.index_select(dimension, perm)
            torch.testing.assert_close(ordered.optimizer.state[moved][key], expected, msg=key)
    if run == "fixed-jumprelu":
        threshold = ordered.sae.activation_fn.threshold
        assert threshold.unique().numel() > 1, "thresholds should have trained apart"
    # and the trainer's per-latent statistics (which pick the dead latents)
    for statistic in ("act_freq_scores", "n_forward_passes_since_fired"):
        expected = getattr(reference, statistic)[perm]
        torch.testing.assert_close(getattr(ordered, statistic), expected, msg=statistic)
    # everything else (b_dec, the prefix sampler's state, BatchTopK's threshold) is shared
    shared = {name: value for name, value in reference.sae.state_dict().items()}
    for name, value in ordered.sae.state_dict().items():
        if name.removeprefix("activation_fn.") not in ("W_enc", "W_dec", "b_enc", "threshold"):
            torch.testing.assert_close(value, shared[name], msg=name)
    # after the last ordering the counts it ranked by are in order, within each block
    _assert_blockwise_non_increasing(ordering.last_counts, bounds)


def test_sampled_prefixes_are_ordered_globally() -> None:
    """With real sampled prefixes the order is global and the saved SAE ends ordered."""
    cfg = _cfg(prefix_sampling="pareto", n_sampled_prefixes=4, order_latents_every=3)
    trainer = _train(cfg, 7)
    ordering = getattr(trainer, TRAINER_ATTRIBUTE)
    assert ordering.n_orderings == 3  # after steps 3, 6 and the last
    _assert_blockwise_non_increasing(ordering.last_counts, [D_SAE])
    perm = ordering.permutation
    # some latent crossed a fixed evaluation width: the order is not within groups
    assert any(
        set(perm[start:stop].tolist()) != set(range(start, stop))
        for start, stop in zip([0, *cfg.matryoshka_widths], cfg.matryoshka_widths, strict=False)
    )


def test_the_frequency_window_counts_since_the_last_ordering_across_trainer_resets() -> None:
    """The counts of SAELens's resetting ``act_freq_scores``, summed since the last ordering."""
    window = FrequencyWindow()
    scores = torch.zeros(4)
    scores += torch.tensor([1.0, 0.0, 2.0, 0.0])
    window.observe(scores)
    torch.testing.assert_close(window.counts(), torch.tensor([1.0, 0.0, 2.0, 0.0]))
    window.restart()  # an ordering
    scores += torch.tensor([0.0, 3.0, 0.0, 0.0])
    window.observe(scores)
    torch.testing.assert_close(window.counts(), torch.tensor([0.0, 3.0, 0.0, 0.0]))
    scores = torch.zeros(4)  # the trainer starts a new window (a new tensor)
    scores += torch.tensor([1.0, 1.0, 0.0, 5.0])
    window.observe(scores)
    torch.testing.assert_close(window.counts(), torch.tensor([1.0, 4.0, 0.0, 5.0]))
    window.restart()
    window.observe(scores)
    torch.testing.assert_close(window.counts(), torch.zeros(4))


@single_thread()
def test_order_latents_orders_a_trained_sae_and_the_saved_sae_is_the_ordered_one(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    sae = quick_train(MatryoshkaTrainingSAE(_cfg(activation="jumprelu", k=None, dtype="float32")))
    before = to_inference(sae)
    x = torch.randn(64, D_IN)
    frequencies = (before.encode(x) > 0).float().mean(0)
    thresholds = sae.activation_fn.threshold.detach().clone()

    perm = order_latents(sae, frequencies)
    _assert_blockwise_non_increasing(frequencies[perm], WIDTHS)
    assert not torch.equal(perm, torch.arange(D_SAE))
    torch.testing.assert_close(sae.activation_fn.threshold, thresholds[perm])

    sae.save_inference_model(str(tmp_path))
    loaded = SAE.load_from_disk(str(tmp_path))
    torch.testing.assert_close(loaded.W_dec, before.W_dec[perm])
    torch.testing.assert_close(loaded.threshold, before.threshold[perm])
    torch.testing.assert_close(loaded.encode(x), before.encode(x)[:, perm])
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), before.decode(before.encode(x)))
    # ordering an ordered SAE changes nothing (ties keep their order)
    assert torch.equal(order_latents(sae, frequencies[perm]), torch.arange(D_SAE))
    # an inference SAE orders the same way
    inference = copy.deepcopy(before)
    assert torch.equal(order_latents(inference, frequencies), perm)
    torch.testing.assert_close(inference.encode(x), loaded.encode(x))


@pytest.mark.parametrize(
    ("frequencies", "bounds", "expected"),
    [
        (torch.zeros(D_SAE - 1), None, r"shape \(32,\)"),
        ([0.0] * D_SAE, None, r"tensor of shape \(32,\)"),
        (torch.full((D_SAE,), float("nan")), None, "finite"),
        (torch.zeros(D_SAE), [12, 4, 32], "strictly increasing"),
        (torch.zeros(D_SAE), [4, 12], "the last d_sae=32"),
    ],
)
def test_order_latents_refuses_bad_input(frequencies: Any, bounds: Any, expected: str) -> None:
    sae = MatryoshkaTrainingSAE(_cfg(dtype="float32"))
    with pytest.raises(ValueError, match=expected):
        order_latents(sae, frequencies, bounds=bounds)


@pytest.mark.parametrize("value", [-1, 1.5, True, "10", None])
def test_order_latents_every_is_validated(value: Any) -> None:
    with pytest.raises(
        ValueError, match=r"MatryoshkaTrainingSAEConfig\.order_latents_every must be an integer"
    ):
        _cfg(order_latents_every=value)


def test_off_by_default_and_nothing_happens() -> None:
    assert MatryoshkaTrainingSAEConfig.__dataclass_fields__["order_latents_every"].default == 0
    trainer = _train(_cfg(), 3)
    assert TrainerOrdering.of(trainer) is None
    assert getattr(trainer, TRAINER_ATTRIBUTE, None) is None


def test_latent_sharding_refuses_ordering() -> None:
    part = LatentPart(0, D_SAE // 2, 0, 2)
    cfg = _cfg(dtype="float32", order_latents_every=10)
    with pytest.raises(ValueError, match="order_latents_every=10 cannot be used with latent shard"):
        MatryoshkaTrainingSAE.build_shard(cfg, part, SINGLE_PROCESS)
    shard = MatryoshkaTrainingSAE.build_shard(_cfg(dtype="float32"), part, SINGLE_PROCESS)
    with pytest.raises(ValueError, match="cannot reorder a latent-sharded SAE"):
        order_latents(shard, torch.zeros(D_SAE), bounds=[D_SAE])


@single_thread()
def test_the_runner_trains_orders_and_saves_ordered_latents(
    tmp_path: Path, tiny_model: HookedTransformer, token_dataset: Dataset
) -> None:
    """SAELens's runner on the tiny model: the saved SAE's latents are in frequency order."""
    widths = [8, 24, 64]
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_MODEL, d_sae=64, k=4, matryoshka_widths=widths, order_latents_every=20
    )
    # orderings after steps 20 and 40 (the last); SAELens's window spans the last 20
    cfg = tiny_runner_cfg(sae_cfg, output_path=str(tmp_path), feature_sampling_window=20)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=token_dataset
    )
    trained = runner.run()

    loaded = SAE.load_from_disk(str(tmp_path))
    torch.testing.assert_close(loaded.W_dec, to_inference(trained).W_dec)
    sparsity = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    _assert_blockwise_non_increasing(sparsity, widths)
    assert sparsity[0] > sparsity[widths[0] - 1], "some ordering should show"
