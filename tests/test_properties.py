"""Invariants of levels, truncation, prefix sampling and configs, checked on generated cases."""

from __future__ import annotations

import itertools
import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.levels import pareto_prefix_probabilities, sample_prefix_widths
from sae_lens_matryoshka.losses import level_mse

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nested_widths(draw: st.DrawFn, max_d_sae: int = 48, min_inner: int = 0) -> list[int]:
    d_sae = draw(st.integers(2, max_d_sae))
    inner = draw(st.lists(st.integers(1, d_sae - 1), unique=True, min_size=min_inner, max_size=5))
    return [*sorted(inner), d_sae]


def _sae(widths: list[int], activation: str, seed: int) -> MatryoshkaSAE:
    torch.manual_seed(seed)
    d_sae = widths[-1]
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=6, d_sae=d_sae, matryoshka_widths=widths, activation=activation)
    )  # type: ignore[arg-type]
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(
                torch.rand_like(param) * 0.3 if name == "threshold" else torch.randn_like(param)
            )
    return sae


@SETTINGS
@given(
    widths=nested_widths(),
    activation=st.sampled_from(["jumprelu", "relu"]),
    seed=st.integers(0, 1000),
)
def test_last_level_is_the_full_reconstruction_and_truncation_is_masking(
    widths: list[int], activation: str, seed: int
) -> None:
    sae = _sae(widths, activation, seed)
    x = torch.randn(5, 6)
    acts = sae.encode(x)
    levels = sae.decode_levels(acts)
    torch.testing.assert_close(levels[-1], sae.decode(acts), rtol=1e-4, atol=1e-4)
    for level, width in enumerate(widths):
        masked = acts * (torch.arange(widths[-1]) < width)
        torch.testing.assert_close(levels[level], sae.decode(masked), rtol=1e-4, atol=1e-4)
        small = sae.truncate(width)
        torch.testing.assert_close(small.encode(x), masked[:, :width])
        torch.testing.assert_close(small(x), sae.decode(masked), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(
    d_sae=st.integers(2, 300),
    data=st.data(),
    power=st.floats(0.05, 3.0),
    seed=st.integers(0, 10**6),
)
def test_sampled_prefixes_are_strictly_increasing_and_end_at_d_sae(
    d_sae: int, data: st.DataObject, power: float, seed: int
) -> None:
    n = data.draw(st.integers(1, min(d_sae, 12)))
    widths = sample_prefix_widths(
        pareto_prefix_probabilities(d_sae, power), n, torch.Generator().manual_seed(seed)
    )
    assert len(widths) == n
    assert widths[-1] == d_sae
    assert all(0 < a < b for a, b in itertools.pairwise(widths))


@SETTINGS
@given(
    widths=nested_widths(max_d_sae=512, min_inner=1),
    activation=st.sampled_from(["batchtopk", "topk", "jumprelu", "relu"]),
    sampling=st.sampled_from(["fixed", "pareto"]),
    detach=st.booleans(),
    weighted=st.booleans(),
)
def test_training_config_round_trips_through_dict_and_cfg_json(
    widths: list[int], activation: str, sampling: str, detach: bool, weighted: bool
) -> None:
    d_sae = widths[-1]
    fields = {
        "d_in": 8,
        "d_sae": d_sae,
        "matryoshka_widths": widths,
        "activation": activation,
        "k": min(3, d_sae) if activation in ("batchtopk", "topk") else None,
        "prefix_sampling": sampling,
        "n_sampled_prefixes": min(4, d_sae),
        "detach_between_levels": detach,
        "level_weights": [1.0 + i for i in range(len(widths))]
        if weighted and sampling == "fixed"
        else None,
    }
    cfg = MatryoshkaTrainingSAEConfig(**fields)
    as_json = json.loads(json.dumps(cfg.to_dict()))
    restored = TrainingSAEConfig.from_dict(as_json)
    assert restored.to_dict() == cfg.to_dict()
    inference = MatryoshkaSAEConfig.from_dict(
        json.loads(json.dumps(cfg.get_inference_sae_cfg_dict()))
    )
    assert inference.matryoshka_widths == cfg.matryoshka_widths
    assert (
        MatryoshkaSAEConfig.from_dict(json.loads(json.dumps(inference.to_dict()))).to_dict()
        == inference.to_dict()
    )


@SETTINGS
@given(
    widths=nested_widths(max_d_sae=12, min_inner=1),
    activation=st.sampled_from(["relu", "topk"]),
    seed=st.integers(0, 1000),
)
def test_level_losses_never_increase_with_width_for_an_orthonormal_dictionary(
    widths: list[int], activation: str, seed: int
) -> None:
    """Level l adds its group's decodes to level l-1's reconstruction.

    For arbitrary weights a wrongly oriented decoder row can raise the error, so
    "non-increasing in width" is not an identity of the decode. It holds exactly
    when the latents are the input's coordinates in an orthonormal dictionary
    (tied encoder, no biases): each kept positive coordinate ``c`` removes
    ``c**2`` from the squared error. Checked through the real encode, the
    cumulative level decode and the level loss.
    """
    torch.manual_seed(seed)
    d_sae = widths[-1]
    d_in = d_sae + 2
    dictionary = torch.linalg.qr(torch.randn(d_in, d_sae)).Q.T  # orthonormal rows
    k = {"k": max(d_sae // 3, 1)} if activation == "topk" else {}
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(
            d_in=d_in, d_sae=d_sae, matryoshka_widths=widths, activation=activation, **k
        )  # type: ignore[arg-type]
    )
    with torch.no_grad():
        sae.W_dec.copy_(dictionary)
        sae.W_enc.copy_(dictionary.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randn(16, d_in)
    losses = level_mse(sae.decode_levels(sae.encode(x)), x)
    assert (losses[1:] <= losses[:-1] + 1e-5).all(), losses
