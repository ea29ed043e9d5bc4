"""The decoder object: each option's decoder is wired to compute what its saved SAE computes,
and the options are read once, when the decoder is chosen.

Rows are kept far from unit norm (unless held there), so a decoder that
forgot to rescale, or rescaled where it should not, changes the numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    to_inference,
    to_portable,
)
from sae_lens_matryoshka.decoder import (
    FreeDecoder,
    RescaledDecoder,
    RescaledUnitNormDecoder,
    UnitNormDecoder,
)

from .conftest import quick_train, step_output, train_step

D_IN, D_SAE = 10, 32
WIDTHS = [4, 12, 32]
K_SPARSE = ("batchtopk", "topk")

#: (rescale_acts_by_decoder_norm, normalize_decoder) -> the decoder they choose
DECODERS = {
    (False, False): FreeDecoder,
    (True, False): RescaledDecoder,
    (False, True): UnitNormDecoder,
    (True, True): RescaledUnitNormDecoder,
}
OPTIONS = pytest.mark.parametrize(("rescale", "normalize"), list(DECODERS))
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def _config(activation: str, rescale: bool, normalize: bool) -> MatryoshkaTrainingSAEConfig:
    return MatryoshkaTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        matryoshka_widths=WIDTHS,
        activation=activation,  # type: ignore[arg-type]
        k=3 if activation in K_SPARSE else None,
        rescale_acts_by_decoder_norm=rescale,
        normalize_decoder=normalize,
    )


def _trained(activation: str, rescale: bool, normalize: bool) -> MatryoshkaTrainingSAE:
    """A few Adam steps in, in eval mode, rows as the next step would start with them."""
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(_config(activation, rescale, normalize))
    quick_train(sae, steps=15, batch_size=64)
    # the renormalisation a unit-norm decoder's next step (and its saved SAE) starts with
    sae.decoder.before_step(sae.W_dec)
    norms = sae.W_dec.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.ones(D_SAE)) == normalize
    return sae.eval()


@OPTIONS
def test_options_choose_the_decoder(rescale: bool, normalize: bool) -> None:
    sae = MatryoshkaTrainingSAE(_config("batchtopk", rescale, normalize))
    assert type(sae.decoder) is DECODERS[rescale, normalize]
    inference = MatryoshkaSAE(
        MatryoshkaSAEConfig(
            d_in=D_IN, d_sae=D_SAE, matryoshka_widths=WIDTHS, rescale_acts_by_decoder_norm=rescale
        )
    )
    assert type(inference.decoder) is DECODERS[rescale, False]


@OPTIONS
@pytest.mark.parametrize("activation", ["batchtopk", "topk", "jumprelu", "relu"])
def test_saved_sae_computes_what_the_training_sae_computes(
    activation: str, rescale: bool, normalize: bool
) -> None:
    sae = _trained(activation, rescale, normalize)
    saved = to_inference(sae)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        acts = sae.encode(x)
        assert int((acts > 0).sum()) > 0
        torch.testing.assert_close(saved.encode(x), acts, **CLOSE)
        torch.testing.assert_close(saved.decode(acts), sae.decode(acts), **CLOSE)
        torch.testing.assert_close(saved.decode_levels(acts), sae.decode_levels(acts), **CLOSE)


@OPTIONS
def test_l1_penalises_activations_times_the_norms_of_the_rows_they_multiply(
    rescale: bool, normalize: bool
) -> None:
    """Measured on the saved SAE, whose rows are the ones activations multiply."""
    sae = _trained("relu", rescale, normalize)
    x = torch.randn(50, D_IN)
    l1 = step_output(sae, x, l1=0.5).losses["l1_loss"]
    saved = to_inference(sae)
    with torch.no_grad():
        nested = sum((torch.arange(D_SAE) < width).float() for width in WIDTHS)
        per_token = (saved.encode(x) * saved.W_dec.norm(dim=-1) * nested).sum(dim=-1)
    torch.testing.assert_close(l1, 0.5 * per_token.mean(), **CLOSE)


@OPTIONS
@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_folding_the_input_scaling_keeps_what_the_sae_computes(
    activation: str, rescale: bool, normalize: bool
) -> None:
    """Folded, the SAE reads unscaled inputs and writes unscaled outputs; thresholds follow."""
    sae = _trained(activation, rescale, normalize)
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(4.0)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(folded(x / 4.0), sae(x) / 4.0, **CLOSE)


@OPTIONS
@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu", "relu"])
def test_folding_decoder_norms_keeps_what_the_sae_computes(
    activation: str, rescale: bool, normalize: bool
) -> None:
    sae = _trained(activation, rescale, normalize)
    folded = copy.deepcopy(sae)
    if activation in K_SPARSE and not rescale:
        with pytest.raises(NotImplementedError, match="top-k"):
            folded.fold_W_dec_norm()
        return
    folded.fold_W_dec_norm()
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(folded.W_dec.norm(dim=-1), torch.ones(D_SAE))
        torch.testing.assert_close(folded(x), sae(x), **CLOSE)


def _inference_sae(rescale: bool, activation: str = "jumprelu") -> MatryoshkaSAE:
    torch.manual_seed(0)
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            matryoshka_widths=WIDTHS,
            activation=activation,  # type: ignore[arg-type]
            k=3 if activation == "topk" else None,
            rescale_acts_by_decoder_norm=rescale,
        )
    )
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(
                torch.rand_like(param) * 0.2 if name == "threshold" else torch.randn_like(param)
            )
    return sae


def test_inference_fold_chooses_the_decoder_again() -> None:
    """After folding, the SAE computes what a new SAE of its config and weights does, whatever the rows."""
    sae = _inference_sae(rescale=True)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        before = sae(x)
        sae.fold_W_dec_norm()
        assert not sae.cfg.rescale_acts_by_decoder_norm
        torch.testing.assert_close(sae(x), before, **CLOSE)
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])  # rows off unit norm again
        new = MatryoshkaSAE(sae.cfg)
        new.load_state_dict(sae.state_dict())
        assert torch.equal(sae(x), new(x))


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    else:
        assert a == b


@OPTIONS
@pytest.mark.parametrize(
    ("activation", "training_path"), [("batchtopk", "sparse"), ("relu", "dense")]
)
def test_training_sae_reads_the_options_only_when_built(
    activation: str, training_path: str, rescale: bool, normalize: bool
) -> None:
    """Flipping both options on a built SAE's config changes nothing it computes: no code
    outside the decoder object's choice reads them (the saved config leaves the rescale off)."""
    twins = []
    for flip in (False, True):
        torch.manual_seed(0)
        cfg = _config(activation, rescale, normalize)
        cfg.training_path = training_path  # type: ignore[assignment]
        sae = MatryoshkaTrainingSAE(cfg)
        if flip:
            cfg.rescale_acts_by_decoder_norm = not rescale
            cfg.normalize_decoder = not normalize
        twins.append(sae)
    results = []
    for sae in twins:
        torch.manual_seed(1)
        x = torch.randn(64, D_IN)
        dead = torch.arange(D_SAE) % 3 == 0
        out = train_step(sae, x, dead, l1=0.5)
        result: dict[str, object] = {"loss": out.loss.detach(), **out.losses}
        result |= {f"grad {n}": p.grad for n, p in sae.named_parameters() if p.grad is not None}
        sae.eval()
        with torch.no_grad():
            result |= {"encode": sae.encode(x), "forward": sae(x)}
            result |= {f"saved {n}": t for n, t in to_inference(sae).state_dict().items()}
            scaled = copy.deepcopy(sae)
            scaled.fold_activation_norm_scaling_factor(4.0)
            result["scaled"] = scaled(x)
            if rescale or activation not in K_SPARSE:
                folded = copy.deepcopy(sae)
                folded.fold_W_dec_norm()
                result["folded"] = folded(x)
        results.append(result)
    _assert_same(*results)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_inference_sae_reads_the_option_only_when_built(activation: str, rescale: bool) -> None:
    """As for the training SAE: flipping the option on a built SAE's config changes nothing."""
    twins = [_inference_sae(rescale, activation), _inference_sae(rescale, activation)]
    twins[1].cfg.rescale_acts_by_decoder_norm = not rescale
    results = []
    x = torch.randn(50, D_IN)
    for sae in twins:
        with torch.no_grad():
            acts = sae.encode(x)
            result: dict[str, object] = {
                "encode": acts,
                "encode width": sae.encode(x, 12),
                "decode": sae.decode(acts),
                "levels": sae.decode_levels(acts),
                "portable": to_portable(sae)(x),
            }
            if rescale or activation != "topk":
                sae.fold_W_dec_norm()
                result |= {f"folded {n}": t for n, t in sae.state_dict().items()}
                result["folded option"] = sae.cfg.rescale_acts_by_decoder_norm
        results.append(result)
    _assert_same(*results)


@pytest.mark.parametrize("replaced_by", ["deepcopy", "load_from_disk"])
def test_a_unit_norm_decoder_projects_the_gradient_of_a_replaced_w_dec(
    replaced_by: str, tmp_path: Path
) -> None:
    """A deep copy, or SAELens's loader (which assigns the loaded tensors), trains as the original."""
    torch.manual_seed(0)
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=16, d_sae=64, k=4, matryoshka_widths=[8, 64], normalize_decoder=True
    )
    original = MatryoshkaTrainingSAE(cfg)
    if replaced_by == "deepcopy":
        other = copy.deepcopy(original)
    else:
        original.save_model(tmp_path)
        other = MatryoshkaTrainingSAE.load_from_disk(tmp_path)
    assert other.W_dec is not original.W_dec
    x = torch.randn(32, 16)
    train_step(original, x)
    train_step(other, x)
    assert original.W_dec.grad is not None and other.W_dec.grad is not None
    torch.testing.assert_close(other.W_dec.grad, original.W_dec.grad)
    along_rows = (other.W_dec.grad * other.W_dec.detach()).sum(dim=-1)
    assert along_rows.abs().max() < 1e-5  # projected onto the unit sphere's tangent
