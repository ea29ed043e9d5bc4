"""The first training batch's warnings: data a run cannot learn from, said once with its numbers."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.first_batch import BatchWarning, measure
from sae_lens_matryoshka.step import encode_dense

from .conftest import ACTIVATION_FIELDS, step_output

D_IN, D_SAE = 16, 64
ACTIVATIONS = ["batchtopk", "topk", "jumprelu", "relu"]


def _sae(activation: str, **fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    base = {"d_in": D_IN, "d_sae": D_SAE, "matryoshka_widths": [8, 24, D_SAE]}
    cfg = base | {"activation": activation} | ACTIVATION_FIELDS[activation] | fields
    return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**cfg))


def _batch() -> torch.Tensor:
    return torch.randn(128, D_IN, generator=torch.Generator().manual_seed(1))


def _batch_warnings(sae: MatryoshkaTrainingSAE, x: torch.Tensor, step: int = 0) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step_output(sae, x, step=step, l1=1.0, l0=1.0)
    return [str(w.message) for w in caught if issubclass(w.category, BatchWarning)]


def test_measure_gives_the_hand_computed_numbers() -> None:
    x = torch.tensor([[3.0, 4.0], [3.0, -4.0], [0.0, 0.0]])
    sae = _sae("relu", d_in=2, d_sae=4, matryoshka_widths=[2, 4])
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        encoding = encode_dense(sae, x, sae.collectives)
    scale = measure(x, encoding)
    assert scale.rms == pytest.approx(math.sqrt((9 + 16 + 9 + 16) / 6))
    # the mean is (2, 0): distances 3^2+4^2 -> (1+16, 1+16, 4) -> mean 38/3
    assert scale.spread == pytest.approx(math.sqrt(38 / 3))
    assert scale.largest_entry == 4.0
    # pre-activations per token (x0, -x0, x1, 0): (3, -3, 4, 0), (3, -3, -4, 0), zeros
    assert scale.n_fired == 3
    assert scale.largest_pre_activation == 4.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ordinary_activations_raise_no_warning(activation: str) -> None:
    assert _batch_warnings(_sae(activation), _batch()) == []


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda x: torch.zeros_like(x), "all zeros"),
        (lambda x: x * 1e-30, "root mean square 1.03e-30"),
        (lambda x: x * 1e7, "normalize_activations='expected_average_only_in'"),
        (lambda x: x[:1].expand_as(x).clone(), "same activation vector"),
    ],
    ids=["zeros", "tiny", "huge", "constant"],
)
def test_data_a_run_cannot_learn_from_is_warned_on_the_first_step_only(
    activation: str, make: Any, expected: str
) -> None:
    x = make(_batch())
    found = _batch_warnings(_sae(activation), x)
    assert len(found) >= 1 and any(expected in message for message in found), found
    assert _batch_warnings(_sae(activation), x, step=5) == []


def test_a_jumprelu_threshold_above_every_pre_activation_is_named() -> None:
    found = _batch_warnings(_sae("jumprelu", jumprelu_init_threshold=1e30), _batch())
    assert len(found) == 1
    assert "no latent fired" in found[0] and "jumprelu_init_threshold" in found[0]
    assert "1e+30" in found[0]


def test_nothing_firing_for_another_reason_does_not_blame_the_threshold() -> None:
    """A ReLU SAE whose encoder gives only negative pre-activations: no threshold to name."""
    sae = _sae("relu")
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
    found = _batch_warnings(sae, _batch())
    assert len(found) == 1 and "no latent fired" in found[0]
    assert "jumprelu_init_threshold" not in found[0]


def test_a_one_token_batch_is_not_called_constant() -> None:
    assert _batch_warnings(_sae("relu"), _batch()[:1]) == []
