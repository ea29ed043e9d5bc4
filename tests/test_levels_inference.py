"""Level-aware inference: encode/decode at a width, truncate, splicing into a model, and load checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig

WIDTHS = [4, 12, 32]


def _sae(
    activation: str = "jumprelu", rescale: bool = False, hook_name: str | None = None
) -> MatryoshkaSAE:
    torch.manual_seed(0)
    cfg = MatryoshkaSAEConfig(
        d_in=8,
        d_sae=32,
        matryoshka_widths=WIDTHS,
        activation=activation,  # type: ignore[arg-type]
        k=3 if activation == "topk" else None,
        rescale_acts_by_decoder_norm=rescale,
    )
    if hook_name is not None:
        cfg.metadata.hook_name = hook_name
    sae = MatryoshkaSAE(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(
                torch.rand_like(param) * 0.3
                if name.endswith("threshold")
                else torch.randn_like(param) * 0.5
            )
    return sae


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("width", WIDTHS)
def test_encode_and_decode_at_a_level_equal_masking_the_rest(
    activation: str, rescale: bool, width: int
) -> None:
    sae = _sae(activation, rescale)
    x = torch.randn(20, 8)
    full = sae.encode(x)
    torch.testing.assert_close(sae.encode(x, width=width), full[:, :width])
    masked = full * (torch.arange(32) < width)
    torch.testing.assert_close(
        sae.decode(full, width=width), sae.decode(masked), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        sae.decode(full[:, :width], width=width), sae.decode(masked), rtol=1e-5, atol=1e-5
    )
    level = WIDTHS.index(width)
    torch.testing.assert_close(
        sae.decode_levels(full)[level], sae.decode(masked), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
@pytest.mark.parametrize("rescale", [False, True])
def test_truncate_is_a_standalone_sae_equal_to_the_restriction(
    activation: str, rescale: bool
) -> None:
    sae = _sae(activation, rescale)
    small = sae.truncate(12)
    assert isinstance(small, MatryoshkaSAE)
    assert small.cfg.d_sae == 12
    assert small.matryoshka_widths == [4, 12]
    assert small.cfg.metadata.truncated_from_d_sae == 32
    x = torch.randn(20, 8)
    torch.testing.assert_close(small.encode(x), sae.encode(x, width=12))
    torch.testing.assert_close(small(x), sae.decode(sae.encode(x), width=12), rtol=1e-5, atol=1e-5)
    small.W_dec.data.zero_()  # a copy, not a view
    assert sae.W_dec.abs().sum() > 0


def test_truncated_sae_saves_and_loads(tmp_path: Path) -> None:
    small = _sae().truncate(12)
    small.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MatryoshkaSAE) and loaded.matryoshka_widths == [4, 12]
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded(x), small(x))


def test_untrained_widths_warn_and_bad_widths_fail() -> None:
    sae = _sae()
    with pytest.warns(UserWarning, match="width 7 was not trained as a level"):
        small = sae.truncate(7)
    assert small.matryoshka_widths == [4, 7]
    with pytest.warns(UserWarning, match="not trained as a level"):
        sae.encode(torch.randn(2, 8), width=20)
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError, match=r"width must be an integer in \[1, d_sae=32\]"):
            sae.truncate(bad)  # type: ignore[arg-type]


def test_truncating_topk_warns_that_selection_changes() -> None:
    with pytest.warns(UserWarning, match="selects its k latents among the first 12"):
        small = _sae("topk").truncate(12)
    assert small.cfg.k == 3
    assert ((small.encode(torch.randn(10, 8)) > 0).sum(-1) <= 3).all()


def test_truncated_sae_spliced_into_a_real_model() -> None:
    torch.manual_seed(0)
    model = HookedSAETransformer(
        HookedTransformerConfig(
            n_layers=1,
            d_model=8,
            n_ctx=10,
            d_head=2,
            n_heads=4,
            d_vocab=40,
            act_fn="gelu",
            normalization_type="LN",
        )
    )
    hook = "blocks.0.hook_resid_post"
    small = _sae(hook_name=hook).truncate(4)
    tokens = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        spliced = model.run_with_saes(tokens, saes=[small])
        by_hand = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: small(act))])
        clean = model(tokens)
    torch.testing.assert_close(spliced, by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced, clean)


def _saved(tmp_path: Path) -> Path:
    _sae().save_model(tmp_path)
    return tmp_path


def test_weights_that_do_not_match_cfg_json_are_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"], cfg["matryoshka_widths"] = 16, [4, 16]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"sae_weights.safetensors does not match cfg.json: W_dec has shape \[32, 8\], but d_in=8, d_sae=16 need \[16, 8\]",
    ):
        SAE.load_from_disk(folder)


def test_missing_thresholds_are_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    weights = load_file(folder / "sae_weights.safetensors")
    del weights["threshold"]
    save_file(weights, folder / "sae_weights.safetensors")
    with pytest.raises(
        ValueError,
        match=r"sae_weights.safetensors lacks \['threshold'\], which cfg.json requires \(activation='jumprelu'",
    ):
        SAE.load_from_disk(folder)


def test_widths_beyond_d_sae_in_cfg_json_are_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["matryoshka_widths"] = [4, 40]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"matryoshka_widths has width 40 at position 1, larger than d_sae=32"
    ):
        SAE.load_from_disk(folder)
