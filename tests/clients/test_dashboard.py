"""SAEDashboard renders a Matryoshka SAE as loaded, with the maxima ``sae.encode`` gives."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sae_dashboard")

from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.feature_data_generator import FeatureMaskingContext
from sae_dashboard.sae_vis_data import SaeVisConfig, SaeVisData
from sae_dashboard.sae_vis_runner import SaeVisRunner
from sae_lens import SAE, HookedSAETransformer

from sae_lens_matryoshka import MatryoshkaSAE, to_portable
from sae_lens_matryoshka.dashboard import save_level_dashboards

from .conftest import HOOK, hook_activations

#: the headless Chromiums examples/dashboard_levels.py --screenshot looks for
CHROMIUMS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def _render(
    sae: SAE, model: HookedSAETransformer, tokens: torch.Tensor, features: list[int]
) -> SaeVisData:
    config = SaeVisConfig(hook_point=HOOK, features=features, minibatch_size_tokens=16)
    return SaeVisRunner(config).run(encoder=sae, model=model, tokens=tokens)


def _encode_maxima(sae: SAE, model: HookedSAETransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Each latent's largest activation over ``tokens``, by ``sae.encode``."""
    with torch.no_grad():
        return sae.encode(hook_activations(model, tokens)).flatten(0, 1).max(dim=0).values


def test_a_loaded_matryoshka_sae_renders_with_encodes_maxima(
    sae: MatryoshkaSAE, model: HookedSAETransformer, tokens: torch.Tensor, tmp_path: Path
) -> None:
    features = list(range(sae.cfg.d_sae))
    data = _render(sae, model, tokens, features)
    # SaeVisRunner folds decoder norms into the SAE it gets; encode that SAE
    expected = _encode_maxima(sae, model, tokens)
    assert expected.gt(0).sum() >= 8  # enough live latents for the comparison to mean something
    torch.testing.assert_close(torch.tensor(data.feature_stats.max), expected, rtol=1e-5, atol=1e-6)
    assert sae.cfg.architecture() == "matryoshka"  # the adapter left the config as it was
    page = tmp_path / "features.html"
    save_feature_centric_vis(data, page)
    html = page.read_text()
    assert "grid-container" in html and len(html) > 10_000


def test_without_the_adapter_saedashboard_refuses_it(
    sae: MatryoshkaSAE,
    model: HookedSAETransformer,
    tokens: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: SAEDashboard's own check, which the adapter answers."""
    monkeypatch.setattr(
        FeatureMaskingContext, "__enter__", FeatureMaskingContext.__enter__.__wrapped__
    )
    with pytest.raises(ValueError, match="Invalid architecture"):
        _render(sae, model, tokens, [0, 1])


def test_the_portable_form_renders_the_same_without_the_plugin(
    sae: MatryoshkaSAE, model: HookedSAETransformer, tokens: torch.Tensor
) -> None:
    portable = to_portable(sae)
    assert type(portable).__module__.startswith("sae_lens.")  # SAELens's own JumpReLUSAE
    ours = _render(sae, model, tokens, list(range(16)))
    theirs = _render(portable, model, tokens, list(range(16)))
    torch.testing.assert_close(
        torch.tensor(ours.feature_stats.max),
        torch.tensor(theirs.feature_stats.max),
        rtol=1e-5,
        atol=1e-6,
    )


def test_one_page_per_level_in_level_order(
    sae: MatryoshkaSAE, model: HookedSAETransformer, tokens: torch.Tensor, tmp_path: Path
) -> None:
    before = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    rendered = save_level_dashboards(
        sae, model, tokens, tmp_path, per_level=4, minibatch_size_tokens=16
    )
    assert rendered.features == [[0, 1, 2, 3], [8, 9, 10, 11], [24, 25, 26, 27]]
    assert [page.name for page in rendered.pages] == [
        "level_0_latents_0-3.html",
        "level_1_latents_8-11.html",
        "level_2_latents_24-27.html",
    ]
    for page, latents in zip(rendered.pages, rendered.features, strict=True):
        html = page.read_text()
        assert "grid-container" in html and len(html) > 10_000
        assert f'START_KEY = "{latents[0]}";' in html  # it opens on a latent it holds
    # the SAE given is left as it was; the maxima are its encode's (norms folded, as SAEDashboard does)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    sae.fold_W_dec_norm()
    shown = [latent for level in rendered.features for latent in level]
    torch.testing.assert_close(
        torch.tensor(rendered.data.feature_stats.max),
        _encode_maxima(sae, model, tokens)[shown],
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_example_writes_a_page_per_level(tmp_path: Path) -> None:
    """Also its SAEBench table (with SAEBench installed) and its screenshot (with a Chromium).

    Offline and without ``--d3-js`` the screenshot shows an empty page (d3
    comes from its CDN); the README's picture was taken with d3 given.
    """
    example = Path(__file__).resolve().parents[2] / "examples" / "dashboard_levels.py"
    command = [sys.executable, str(example), "--output-dir", str(tmp_path), "--per-level", "2"]
    saebench = importlib.util.find_spec("sae_bench") is not None
    chromium = any(shutil.which(name) for name in CHROMIUMS)
    png = tmp_path / "level0.png"
    command += ["--saebench"] * saebench + ["--screenshot", str(png)] * chromium
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    pages = sorted(tmp_path.glob("level_*.html"))
    assert [page.name for page in pages] == [
        "level_0_latents_0-1.html",
        "level_1_latents_8-9.html",
        "level_2_latents_24-25.html",
    ]
    assert all(str(page) in result.stdout for page in pages)
    if saebench:  # one row per level, under SAEBench's metric names
        lines = result.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if "explained_variance" in line)
        assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["8", "24", "64"]
    if chromium:
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
