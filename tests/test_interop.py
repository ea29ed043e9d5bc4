"""Portable export, and importing SAELens SAEs (other libraries' files: test_imports.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from safetensors.torch import load_file, save_file

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    SAEFileError,
    export_portable,
    from_saelens,
    to_inference,
)

from .conftest import quick_train


def _train(sae):
    return quick_train(sae, scale=2.0).eval()


def _ours(activation: str) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    k = 2 if activation in ("batchtopk", "topk") else None
    return _train(
        MatryoshkaTrainingSAE(
            MatryoshkaTrainingSAEConfig(
                d_in=8, d_sae=24, k=k, activation=activation, matryoshka_widths=[4, 12, 24]
            )
        )
    )


LOAD_WITHOUT_PLUGIN = """
import sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
assert "sae_lens_matryoshka" not in sys.modules
sae = SAE.load_from_disk(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"out": sae(x)}, sys.argv[3])
print(type(sae).__name__, sae.cfg.metadata.matryoshka_widths)
"""


@pytest.mark.parametrize(
    ("activation", "plain"),
    [
        ("batchtopk", "JumpReLUSAE"),
        ("topk", "TopKSAE"),
        ("jumprelu", "JumpReLUSAE"),
        ("relu", "StandardSAE"),
    ],
)
def test_portable_export_loads_without_the_plugin(
    activation: str, plain: str, tmp_path: Path
) -> None:
    trained = _ours(activation)
    folder = export_portable(trained, tmp_path / "portable")
    x = torch.randn(16, 8)
    save_file({"x": x}, tmp_path / "x.safetensors")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_PLUGIN,
            str(folder),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split()[0] == plain
    assert "[4, 12, 24]" in result.stdout
    with torch.no_grad():
        torch.testing.assert_close(
            load_file(tmp_path / "out.safetensors")["out"], trained(x), rtol=1e-4, atol=1e-5
        )


def test_portable_round_trip_keeps_the_levels(tmp_path: Path) -> None:
    sae = to_inference(_ours("relu"))
    back = from_saelens(export_portable(sae, tmp_path))
    assert isinstance(back, MatryoshkaSAE) and back.matryoshka_widths == [4, 12, 24]
    x = torch.randn(6, 8)
    torch.testing.assert_close(back(x), sae(x))


def test_rescaled_inference_sae_exports_folded(tmp_path: Path) -> None:
    trained = _ours("relu")
    cfg_dict = {**trained.cfg.get_inference_sae_cfg_dict(), "rescale_acts_by_decoder_norm": True}
    unfolded = MatryoshkaSAE(MatryoshkaSAEConfig.from_dict(cfg_dict))
    unfolded.load_state_dict(trained.state_dict())  # unfolded weights, measured in unit norms
    portable = SAE.load_from_disk(export_portable(unfolded, tmp_path / "portable"))
    assert isinstance(portable, StandardSAE)
    x = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(portable(x), trained(x), rtol=1e-5, atol=1e-5)


def test_saelens_matryoshka_batchtopk_save_imports_with_its_levels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _train(
        MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=8, d_sae=24, k=2, matryoshka_widths=[4, 12, 24]
            )
        )
    )
    source.save_inference_model(tmp_path)
    flat = SAE.load_from_disk(tmp_path)
    assert isinstance(flat, JumpReLUSAE)  # SAELens keeps the levels only in metadata
    imported = from_saelens(tmp_path)
    assert imported.matryoshka_widths == [4, 12, 24]
    assert imported.cfg.activation == "jumprelu"
    x = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), flat(x))
        torch.testing.assert_close(
            imported.decode_levels(imported.encode(x))[-1], flat(x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "source",
    [
        TopKSAE(TopKSAEConfig(d_in=8, d_sae=24, k=3)),
        StandardSAE(StandardSAEConfig(d_in=8, d_sae=24)),
    ],
    ids=["topk", "standard"],
)
def test_any_saelens_sae_with_given_widths(source: SAE) -> None:
    imported = from_saelens(source, matryoshka_widths=[6, 24])
    assert imported.matryoshka_widths == [6, 24]
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(imported(x), source(x))
    with pytest.raises(
        ValueError,
        match=rf"the given {type(source).__name__} \({type(source).__name__}\) records no "
        r"Matryoshka levels: .*; pass matryoshka_widths=\[\.\.\.\] \(strictly increasing, "
        r"ending at d_sae=24\)",
    ):
        from_saelens(source)
    with pytest.raises(ValueError, match="strictly increasing"):
        from_saelens(source, matryoshka_widths=[12, 6, 24])


def test_unsupported_architectures_are_named() -> None:
    with pytest.raises(
        ValueError,
        match=r"Cannot read a GatedSAE \(architecture 'gated'\).*supported: JumpReLUSAE, TopKSAE, StandardSAE",
    ):
        from_saelens(GatedSAE(GatedSAEConfig(d_in=8, d_sae=24)), matryoshka_widths=[24])


def test_saelens_weights_holding_nan_are_refused() -> None:
    source = StandardSAE(StandardSAEConfig(d_in=8, d_sae=24))
    with torch.no_grad():
        source.W_dec[3, 1] = float("nan")
    with pytest.raises(
        SAEFileError, match=r"the given StandardSAE: W_dec holds 1 non-finite value"
    ):
        from_saelens(source, matryoshka_widths=[24])
