"""Matryoshka training under torchrun, offline, on a tiny random model: data parallel or sharded.

    torchrun --standalone --nproc_per_node 2 examples/train_data_parallel.py --output-dir dp_out
    torchrun --standalone --nproc_per_node 2 examples/train_data_parallel.py --latent-shards 2
    python examples/train_data_parallel.py --output-dir dp_out       # the same, one process

Every rank builds the same tiny ``HookedTransformer`` and token dataset
(nothing is downloaded). By default ``distributed.run`` gives each rank a
disjoint shard of the tokens, averages gradients and selects BatchTopK over
the global batch, and rank 0 saves the SAE. With ``--latent-shards 2`` the two
ranks instead read the same tokens and each holds half of the latents; the
whole SAE is gathered and saved by rank 0. For a real model the command line
does the same::

    torchrun --nproc_per_node 8 -m sae_lens_matryoshka train --model_name gemma-2-2b ...
    torchrun --nproc_per_node 8 -m sae_lens_matryoshka train --latent_shards 8 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE, LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig, distributed

HOOK, D_MODEL, CONTEXT = "blocks.1.hook_resid_post", 64, 64


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_data_parallel"))
    parser.add_argument("--training-tokens", type=int, default=100_000)
    parser.add_argument("--batch-tokens", type=int, default=512, help="per replica")
    parser.add_argument(
        "--latent-shards", type=int, default=1, help="ranks that split the latents (default 1)"
    )
    args = parser.parse_args()

    # identical on every rank: same seeds, no downloads
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2,
            d_model=D_MODEL,
            n_ctx=CONTEXT,
            d_head=16,
            n_heads=4,
            d_mlp=256,
            d_vocab=512,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
    )
    tokens = torch.randint(0, 512, (512, CONTEXT), generator=torch.Generator().manual_seed(0))
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(
            d_in=D_MODEL, d_sae=512, k=16, matryoshka_widths=[32, 128, 512]
        ),
        model_name="tiny-random-2l",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=CONTEXT,
        prepend_bos=False,
        training_tokens=args.training_tokens,
        train_batch_size_tokens=args.batch_tokens,
        store_batch_size_prompts=16,
        n_batches_in_buffer=16,
        lr=1e-3,
        seed=0,
        device="cpu",
        output_path=str(args.output_dir),
        checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    distributed.run(
        cfg,
        latent_shards=args.latent_shards,
        override_model=model,
        override_dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
    )
    if distributed.rank() == 0:
        sae = SAE.load_from_disk(args.output_dir)
        assert isinstance(sae, MatryoshkaSAE)
        print(
            f"{distributed.world_size()} rank(s) ({args.latent_shards} latent shard(s) each "
            f"replica) trained one SAE, saved to {args.output_dir}: levels "
            f"{sae.matryoshka_widths}"
        )


if __name__ == "__main__":
    main()
