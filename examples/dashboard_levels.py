"""One SAEDashboard page per Matryoshka level, offline: run with the clients' environment.

    make test-clients                                   # creates .venv-clients once
    .venv-clients/bin/python examples/dashboard_levels.py

Trains a small BatchTopK Matryoshka SAE (levels 8 / 24 / 64) with SAELens's
runner on a tiny random model with a word-level tokenizer (nothing
downloaded), loads it back with ``SAE.load_from_disk`` as a user would, and
writes ``level_<l>_latents_<a>-<b>.html`` into ``--output-dir``: each page
shows the first ``--per-level`` latents that level adds. With your own SAE,
model and tokens it is the one call at the end (``save_level_dashboards``).

``--saebench`` also prints SAEBench's core metrics per level
(``saebench_core_levels``, SAEBench installed). ``--screenshot PNG`` writes a
picture of level 0's page, its most active latent first, with headless
Chromium (``apt-get install chromium-headless-shell``, or ``chromium``). The
pages load d3 and plotly from their CDNs; the picture inlines plotly from the
``plotly`` package, and d3 from ``--d3-js`` (e.g. ``npm install d3@6``, then
``--d3-js node_modules/d3/dist/d3.min.js``), so it renders offline. The
README's ``docs/dashboard_level0.png`` was made so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.dashboard import LevelDashboards, save_level_dashboards

VOCAB, CONTEXT, HOOK = 64, 16, "blocks.0.hook_resid_post"
#: the scripts SAEDashboard's pages load from CDNs
D3_TAG = '<script src="https://d3js.org/d3.v6.min.js"></script>'
PLOTLY_TAG = '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>'
CHROMIUMS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def tiny_model() -> HookedSAETransformer:
    """A one-layer random model and a word-level tokenizer over its vocabulary ``w0 ... w63``."""
    model = HookedSAETransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=16, n_ctx=CONTEXT, d_head=4, n_heads=4, d_mlp=32,
            d_vocab=VOCAB, act_fn="gelu", normalization_type="LN", seed=0,
        )
    )  # fmt: skip
    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # set directly: HookedTransformer.set_tokenizer looks the tokenizer's name up on the Hub
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0")
    return model


def self_contained(html: str, d3_js: Path | None) -> str:
    """``html`` with the scripts it loads from CDNs inlined where a local copy is at hand."""
    if d3_js is not None:
        html = html.replace(D3_TAG, f"<script>{d3_js.read_text()}</script>")
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return html
    return html.replace(PLOTLY_TAG, f"<script>{get_plotlyjs()}</script>")


def screenshot(rendered: LevelDashboards, png: Path, d3_js: Path | None) -> Path:
    """A PNG of level 0's page, most active latent first, taken with headless Chromium."""
    from sae_dashboard.data_writing_fns import save_feature_centric_vis

    browser = next((found for name in CHROMIUMS if (found := shutil.which(name))), None)
    if browser is None:
        raise SystemExit(f"--screenshot needs headless Chromium: none of {CHROMIUMS} is on PATH.")
    level0 = rendered.features[0]
    shown = [latent for level in rendered.features for latent in level]
    maxima = dict(zip(shown, rendered.data.feature_stats.max, strict=True))
    page = png.with_suffix(".html")
    order = sorted(level0, key=maxima.__getitem__, reverse=True)
    save_feature_centric_vis(rendered.data, page, feature_idx=order[0], include_only=order)
    page.write_text(self_contained(page.read_text(), d3_js))
    command = [browser, "--headless", "--hide-scrollbars", "--window-size=1400,1000"]
    if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox
        command.append("--no-sandbox")
    command += [
        "--virtual-time-budget=5000",
        f"--screenshot={png.resolve()}",
        page.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_dashboards"))
    parser.add_argument("--per-level", type=int, default=8, help="latents shown per level")
    parser.add_argument("--saebench", action="store_true", help="print SAEBench's table per level")
    parser.add_argument("--screenshot", type=Path, help="write a PNG of level 0's page here")
    parser.add_argument("--d3-js", type=Path, help="a local d3 v6 d3.min.js for --screenshot")
    args = parser.parse_args()

    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (128, CONTEXT), generator=torch.Generator().manual_seed(0))
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(d_in=16, d_sae=64, matryoshka_widths=[8, 24, 64], k=4),
        model_name="tiny-random",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=CONTEXT,
        training_tokens=64 * 100,
        train_batch_size_tokens=64,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,
        prepend_bos=False,
        output_path=str(args.output_dir / "sae"),
        logger=LoggingConfig(log_to_wandb=False),
        device="cpu",
    )
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()})
    LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()

    sae = SAE.load_from_disk(args.output_dir / "sae")  # a MatryoshkaSAE
    rendered = save_level_dashboards(sae, model, tokens, args.output_dir, per_level=args.per_level)
    for page, latents in zip(rendered.pages, rendered.features, strict=True):
        print(f"{page}  latents {latents[0]}..{latents[-1]}")
    if args.saebench:
        from sae_lens import ActivationsStore

        from sae_lens_matryoshka.evals import saebench_core_levels

        store = ActivationsStore.from_sae(
            model, sae, dataset, context_size=CONTEXT, streaming=False, store_batch_size_prompts=4
        )
        columns = ["width", "explained_variance", "mse", "l0", "ce_loss_score", "kl_div_score"]
        print(" ".join(f"{name:>18}" for name in columns))
        for row in saebench_core_levels(sae, model, store):
            print(" ".join(f"{row[name]:>18.4g}" for name in columns))
    if args.screenshot is not None:
        print(f"{screenshot(rendered, args.screenshot, args.d3_js)}  level 0, most active first")


if __name__ == "__main__":
    main()
