"""Train a Matryoshka SAE on a real language model, then evaluate and plot every level.

With Hugging Face Hub access this trains on the MLP output of
``tiny-stories-1L-21M`` with pretokenized TinyStories (SAELens's tutorial
set-up), runs SAELens's evals on each level (explained variance, L0, dead and
dense latents, CE loss recovered, KL) and saves the table (``levels.json``) and
a plot (``levels.png``). ``--offline`` runs the same pipeline on a tiny random
``HookedTransformer`` and random tokens, downloading nothing.

    python examples/train_tiny_stories.py --output-dir matryoshka_tiny_stories --device cuda
    python examples/train_tiny_stories.py --offline --output-dir matryoshka_offline_levels
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_matryoshka  # noqa: F401  (registers the "matryoshka" architecture)
from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.evals import evaluate_levels, plot_level_metrics
from sae_lens_matryoshka.io.hub import OFFLINE_HINT, hub_errors_in_one_line


def build_config(
    output_dir: Path, training_tokens: int, device: str, log_to_wandb: bool, offline: bool = False
) -> LanguageModelSAERunnerConfig[Any]:
    d_in, d_sae = (64, 512) if offline else (1024, 16 * 1024)
    return LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            # the paper's level fractions 1/32, 3/32, 7/32, 15/32, 1
            matryoshka_widths=[
                d_sae // 32,
                3 * d_sae // 32,
                7 * d_sae // 32,
                15 * d_sae // 32,
                d_sae,
            ],
            k=16 if offline else 32,
            use_matryoshka_aux_loss=True,
        ),
        model_name="tiny-random" if offline else "tiny-stories-1L-21M",
        hook_name="blocks.0.hook_mlp_out",
        dataset_path="" if offline else "apollo-research/roneneldan-TinyStories-tokenizer-gpt2",
        is_dataset_tokenized=True,
        streaming=not offline,
        context_size=64 if offline else 512,
        prepend_bos=not offline,
        training_tokens=training_tokens,
        train_batch_size_tokens=1024 if offline else 4096,
        store_batch_size_prompts=16,
        n_batches_in_buffer=32 if offline else 64,
        lr=1e-3 if offline else 3e-4,
        lr_decay_steps=training_tokens // 4096 // 5,
        device=device,
        output_path=str(output_dir),
        checkpoint_path=None,
        logger=LoggingConfig(
            log_to_wandb=log_to_wandb, wandb_project="sae-lens-matryoshka", wandb_log_frequency=50
        ),
        verbose=False,
    )


def offline_model_and_data() -> tuple[HookedTransformer, Dataset]:
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1,
            d_model=64,
            n_ctx=64,
            d_head=16,
            n_heads=4,
            d_mlp=256,
            d_vocab=512,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
    )
    tokens = torch.randint(0, 512, (256, 64), generator=torch.Generator().manual_seed(0))
    return model, Dataset.from_dict({"input_ids": tokens.tolist()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_tiny_stories"))
    parser.add_argument("--training-tokens", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--wandb", action="store_true", help="log per-level metrics to Weights & Biases"
    )
    parser.add_argument(
        "--offline", action="store_true", help="a tiny random model and random tokens"
    )
    parser.add_argument("--eval-batches", type=int, default=10)
    args = parser.parse_args()

    tokens = args.training_tokens or (200_000 if args.offline else 50_000_000)
    cfg = build_config(args.output_dir, tokens, args.device, args.wandb, offline=args.offline)
    overrides = {}
    if args.offline:
        model, dataset = offline_model_and_data()
        overrides = {"override_model": model, "override_dataset": dataset}
    # no network: one line saying so, not 80
    with hub_errors_in_one_line(f"{OFFLINE_HINT}, or run this example with --offline"):
        runner = LanguageModelSAETrainingRunner(cfg, **overrides)
    sae = runner.run()

    rows = evaluate_levels(
        sae,
        runner.model,
        runner.activations_store,
        n_batches=args.eval_batches,
        exclude_special_tokens=not args.offline,
    )
    (args.output_dir / "levels.json").write_text(json.dumps(rows, indent=2))
    plot_level_metrics(
        rows, args.output_dir / "levels.png", title=f"{cfg.model_name} {cfg.hook_name}"
    )
    columns = ("width", "explained_variance", "l0", "dead_latents", "ce_loss_score")
    print("".join(f"{c:>20}" for c in columns))
    for row in rows:
        print(
            "".join(
                f"{row[c]:>20.3f}" if isinstance(row[c], float) else f"{row[c]:>20}"
                for c in columns
            )
        )


if __name__ == "__main__":
    main()
