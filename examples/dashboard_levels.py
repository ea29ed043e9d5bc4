"""One SAEDashboard page per Matryoshka level, offline: run with the clients' environment.

    make test-clients                                   # creates .venv-clients once
    .venv-clients/bin/python examples/dashboard_levels.py

Trains a small BatchTopK Matryoshka SAE (levels 8 / 24 / 64) with SAELens's
runner on a tiny random model with a word-level tokenizer (nothing
downloaded), loads it back with ``SAE.load_from_disk`` as a user would, and
writes ``level_<l>_latents_<a>-<b>.html`` into ``--output-dir``: each page
shows the first ``--per-level`` latents that level adds. With your own SAE,
model and tokens it is the one call at the end (``save_level_dashboards``).
"""

from __future__ import annotations

import argparse
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
from sae_lens_matryoshka.dashboard import save_level_dashboards

VOCAB, CONTEXT, HOOK = 64, 16, "blocks.0.hook_resid_post"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_dashboards"))
    parser.add_argument("--per-level", type=int, default=8, help="latents shown per level")
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


if __name__ == "__main__":
    main()
