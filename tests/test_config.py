"""Configuration: specific errors at construction, and round trips through dicts and JSON."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_matryoshka import MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig


def make(**fields: Any) -> MatryoshkaTrainingSAEConfig:
    base: dict[str, Any] = {"d_in": 8, "d_sae": 64, "k": 4, "matryoshka_widths": [8, 32, 64]}
    base.update(fields)
    return MatryoshkaTrainingSAEConfig(**base)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"matryoshka_widths": [8, 8, 64]},
            r"strictly increasing.*\[8, 8, 64\].*8 at position 0 is followed by 8",
        ),
        (
            {"matryoshka_widths": [32, 8, 64]},
            r"strictly increasing.*32 at position 0 is followed by 8",
        ),
        ({"matryoshka_widths": [0, 8, 64]}, r"positive widths, got 0 at position 0"),
        ({"matryoshka_widths": [-4, 8, 64]}, r"positive widths, got -4 at position 0"),
        ({"matryoshka_widths": [8, 128]}, r"width 128 at position 1, larger than d_sae=64"),
        ({"matryoshka_widths": []}, r"matryoshka_widths is empty"),
        (
            {"matryoshka_widths": [8, 16.5, 64]},
            r"matryoshka_widths\[1\] must be an integer, got 16.5",
        ),
        ({"k": None}, r"k is required for activation='batchtopk'"),
        ({"k": 0}, r"k must be in \(0, d_sae=64\], got 0"),
        ({"k": -3}, r"k must be in \(0, d_sae=64\], got -3"),
        ({"k": 65}, r"k must be in \(0, d_sae=64\], got 65"),
        ({"k": "4"}, r"k must be a number, got '4'"),
        (
            {"activation": "softmax"},
            r"activation must be one of 'batchtopk', 'topk', 'jumprelu', 'relu'; got 'softmax'",
        ),
        ({"d_sae": 0}, r"d_sae must be a positive integer, got 0"),
        ({"d_in": -1}, r"d_in must be a positive integer, got -1"),
        ({"topk_threshold_lr": 0.0}, r"topk_threshold_lr must be a finite number > 0.0, got 0.0"),
        ({"topk_threshold_lr": 1.5}, r"topk_threshold_lr must be in \(0, 1\], got 1.5"),
        ({"activation": "relu"}, r"k is only used by activation batchtopk / topk.*got 4"),
        (
            {"activation": "topk", "k": 2.5},
            r"k must be a whole number for activation='topk', got 2.5",
        ),
        (
            {"level_weights": [1.0, 2.0]},
            r"level_weights has 2 entries but matryoshka_widths \[8, 32, 64\] has 3 levels",
        ),
        (
            {"level_weights": [1.0, -1.0, 1.0]},
            r"level_weights\[1\] must be a finite number >= 0.0, got -1.0",
        ),
        (
            {"level_weights": [1.0, float("nan"), 1.0]},
            r"level_weights\[1\] must be a finite number",
        ),
        ({"level_weights": [0, 0, 0]}, r"level_weights are all zero"),
        (
            {"level_weights": [1, 1, 1], "prefix_sampling": "pareto"},
            r"level_weights needs prefix_sampling='fixed'",
        ),
        (
            {"prefix_sampling": "random"},
            r"prefix_sampling must be one of 'fixed', 'pareto'; got 'random'",
        ),
        ({"n_sampled_prefixes": 0}, r"n_sampled_prefixes must be an integer >= 1, got 0"),
        (
            {"n_sampled_prefixes": 65, "prefix_sampling": "pareto"},
            r"n_sampled_prefixes=65 exceeds d_sae=64",
        ),
        ({"pareto_power": 0.0}, r"pareto_power must be a finite number > 0.0, got 0.0"),
        ({"prefix_sampling_seed": -1}, r"prefix_sampling_seed must be an integer >= 0, got -1"),
        # configurations that used to be accepted and could not train (issue 25)
        (
            {"level_weights": [1.0, 1e-320, 1.0]},
            r"level_weights\[1\]=1e-320 rounds to 0 in float32",
        ),
        (
            {"pareto_power": 1e-300, "prefix_sampling": "pareto"},
            r"pareto_power must be in \[0.001, 10.0\].*got 1e-300",
        ),
        ({"pareto_power": 1e300}, r"pareto_power must be in \[0.001, 10.0\].*got 1e\+300"),
        ({"prefix_sampling_seed": 2**70}, r"prefix_sampling_seed must be below 2\*\*64"),
        ({"dtype": "fp32"}, r"dtype must be one of \['float32', .*got 'fp32'"),
        ({"decoder_init_norm": 0.0}, r"decoder_init_norm must be a finite number > 0.*got 0.0"),
        ({"decoder_init_norm": float("nan")}, r"decoder_init_norm must be a finite number > 0"),
        ({"l1_coefficient": -0.1}, r"l1_coefficient must be a finite number >= 0.0, got -0.1"),
        ({"jumprelu_bandwidth": 0.0}, r"jumprelu_bandwidth must be a finite number > 0.0"),
        ({"l0_warm_up_steps": -5}, r"l0_warm_up_steps must be an integer >= 0, got -5"),
        ({"aux_loss_coefficient": -1.0}, r"aux_loss_coefficient must be a finite number >= 0.0"),
        (
            {"normalize_activations": "layer_norm"},
            r"aux loss does not support normalize_activations='layer_norm'",
        ),
    ],
)
def test_bad_training_config_fails_at_construction(fields: dict[str, Any], message: str) -> None:
    """Each refused with the field, what was expected and what was given, before any model loads."""
    with pytest.raises(ValueError, match=message) as info:
        make(**fields)
    assert "MatryoshkaTrainingSAEConfig" in str(info.value)


def test_missing_last_width_is_appended_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="does not end at d_sae=64"):
        cfg = make(matryoshka_widths=[8, 32])
    assert cfg.matryoshka_widths == [8, 32, 64]


def test_layer_norm_is_allowed_without_aux_loss() -> None:
    cfg = make(normalize_activations="layer_norm", aux_loss_coefficient=0.0)
    assert cfg.normalize_activations == "layer_norm"


def test_integral_k_is_stored_as_int_and_fractional_k_kept() -> None:
    assert make(k=4.0).k == 4
    assert isinstance(make(k=4.0).k, int)
    assert make(k=2.5).k == 2.5


def test_training_config_round_trips_through_json() -> None:
    cfg = make(use_matryoshka_aux_loss=True, aux_loss_coefficient=1 / 32, k=2.5)
    restored = TrainingSAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert isinstance(restored, MatryoshkaTrainingSAEConfig)
    assert restored.to_dict() == cfg.to_dict()


def test_runner_config_from_dict_selects_matryoshka() -> None:
    sae_dict = {
        "architecture": "matryoshka",
        "d_in": 16,
        "d_sae": 64,
        "k": 4,
        "matryoshka_widths": [8, 24, 64],
        "use_matryoshka_aux_loss": True,
    }
    cfg = LanguageModelSAERunnerConfig.from_dict(
        {"sae": sae_dict, "logger": {"log_to_wandb": False}, "verbose": False}
    )
    assert isinstance(cfg.sae, MatryoshkaTrainingSAEConfig)
    assert cfg.sae.matryoshka_widths == [8, 24, 64]
    assert cfg.sae.use_matryoshka_aux_loss
    again = LanguageModelSAERunnerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.sae.to_dict() == cfg.sae.to_dict()


def test_runner_config_from_dict_reports_bad_widths() -> None:
    sae_dict = {
        "architecture": "matryoshka",
        "d_in": 16,
        "d_sae": 64,
        "k": 4,
        "matryoshka_widths": [24, 8, 64],
    }
    with pytest.raises(ValueError, match="strictly increasing"):
        LanguageModelSAERunnerConfig.from_dict({"sae": sae_dict, "logger": {}})


def test_inference_config_built_from_training_config() -> None:
    cfg = make()
    inference = MatryoshkaSAEConfig.from_dict(cfg.get_inference_sae_cfg_dict())
    assert isinstance(inference, MatryoshkaSAEConfig)
    assert inference.activation == "jumprelu"
    assert inference.matryoshka_widths == [8, 32, 64]
    details = inference.metadata.training_architecture_details
    assert details["activation"] == "batchtopk"
    assert details["k"] == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"matryoshka_widths": [8, 32]}, r"must end at d_sae=64, got \[8, 32\]"),
        ({"matryoshka_widths": [8, 96]}, r"width 96 at position 1, larger than d_sae=64"),
        ({"activation": "topk"}, r"k is required for activation='topk'"),
        ({"activation": "relu", "k": 3}, r"k is only used by activation batchtopk / topk"),
        (
            {"activation": "gelu"},
            r"activation must be one of 'jumprelu', 'topk', 'relu'; got 'gelu'",
        ),
    ],
)
def test_bad_inference_config_fails(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"d_in": 8, "d_sae": 64, "matryoshka_widths": [8, 32, 64]}
    base.update(fields)
    with pytest.raises(ValueError, match=message):
        MatryoshkaSAEConfig(**base)


def test_valid_config_emits_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


def test_pareto_defaults_to_power_of_two_eval_widths() -> None:
    cfg = make(prefix_sampling="pareto", matryoshka_widths=[], d_sae=1024)
    assert cfg.matryoshka_widths == [32, 64, 128, 256, 512, 1024]
    assert make(prefix_sampling="pareto", matryoshka_widths=[16, 64]).matryoshka_widths == [16, 64]


def test_fixed_prefixes_need_widths() -> None:
    with pytest.raises(ValueError, match="matryoshka_widths is empty"):
        make(matryoshka_widths=[])


@pytest.mark.parametrize(
    ("activation", "k", "inference_activation"),
    [
        ("batchtopk", 4, "jumprelu"),
        ("topk", 4, "topk"),
        ("jumprelu", None, "jumprelu"),
        ("relu", None, "relu"),
    ],
)
def test_each_activation_maps_to_its_inference_config(
    activation: str, k: int | None, inference_activation: str
) -> None:
    cfg = make(activation=activation, k=k)
    inference = MatryoshkaSAEConfig.from_dict(cfg.get_inference_sae_cfg_dict())
    assert inference.activation == inference_activation
    assert inference.k == (4 if activation == "topk" else None)
    assert inference.rescale_acts_by_decoder_norm is False
    assert inference.metadata.training_architecture_details["activation"] == activation


def test_inference_config_refuses_a_checkpoint_config_naming_the_loaders() -> None:
    with pytest.raises(
        ValueError,
        match=r"activation='batchtopk' is a training activation.*"
        r"SAE\.load_from_disk",
    ):
        MatryoshkaSAEConfig(
            d_in=8, d_sae=64, matryoshka_widths=[8, 64], activation="batchtopk", k=4
        )  # type: ignore[arg-type]


def test_suggested_widths_are_valid_for_tiny_dictionaries() -> None:
    with pytest.warns(UserWarning, match=r"e\.g\. \[1, 2\]"):
        MatryoshkaTrainingSAEConfig(d_in=4, d_sae=2, k=1, matryoshka_widths=[2])
    with pytest.raises(ValueError, match=r"e\.g\. \[1, 2\] for d_sae=2"):
        MatryoshkaTrainingSAEConfig(d_in=4, d_sae=2, k=1, matryoshka_widths=[])


def test_the_limits_of_the_new_checks_still_train() -> None:
    """The edges of each range are accepted: a 0 level weight, float32's smallest, every dtype."""
    make(level_weights=[1.0, 0.0, 1.2e-38])
    make(prefix_sampling="pareto", pareto_power=1e-3)
    make(prefix_sampling="pareto", pareto_power=10.0, prefix_sampling_seed=2**64 - 1)
    for dtype in ("float32", "torch.bfloat16", "float64"):
        assert make(dtype=dtype).dtype == dtype
    assert make(decoder_init_norm=None).decoder_init_norm is None
