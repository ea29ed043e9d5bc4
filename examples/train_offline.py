"""Train a Matryoshka SAE offline, on a tiny random TransformerLens model, in well under a minute.

Nothing is downloaded: the model is a randomly initialised ``HookedTransformer``
and the data is random token ids. The run goes through SAELens's own
``LanguageModelSAETrainingRunner``; the saved folder is loaded back with
``SAE.load_from_disk`` and every level's reconstruction is reported.

    python examples/train_offline.py --output-dir matryoshka_offline
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sae_lens_matryoshka  # noqa: F401  (registers the "matryoshka" architecture)
from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig

HOOK = "blocks.1.hook_resid_post"


def tiny_model(seed: int) -> HookedTransformer:
    return HookedTransformer(
        HookedTransformerConfig(
            n_layers=2,
            d_model=64,
            n_ctx=64,
            d_head=16,
            n_heads=4,
            d_mlp=256,
            d_vocab=512,
            act_fn="gelu",
            normalization_type="LN",
            seed=seed,
        )
    )


def random_tokens(seed: int, n_sequences: int = 256, context: int = 64) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 512, (n_sequences, context), generator=generator)
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("matryoshka_offline"))
    parser.add_argument("--training-tokens", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = tiny_model(args.seed)
    # one pass: as many sequences as the run trains on (a shorter dataset is warned of)
    dataset = random_tokens(args.seed, n_sequences=-(-args.training_tokens // 64))
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(
            d_in=64,
            d_sae=512,
            k=16,
            matryoshka_widths=[32, 96, 224, 512],
            use_matryoshka_aux_loss=True,
        ),
        model_name="tiny-random-2l",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=64,
        prepend_bos=False,
        training_tokens=args.training_tokens,
        train_batch_size_tokens=1024,
        store_batch_size_prompts=16,
        n_batches_in_buffer=32,
        lr=1e-3,
        seed=args.seed,
        device="cpu",
        output_path=str(args.output_dir),
        checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()

    sae = SAE.load_from_disk(args.output_dir)
    assert isinstance(sae, MatryoshkaSAE)
    _, cache = model.run_with_cache(torch.as_tensor(dataset["input_ids"][:32]), names_filter=HOOK)
    acts = cache[HOOK].reshape(-1, 64)
    with torch.no_grad():
        latents = sae.encode(acts)
        levels = sae.decode_levels(latents)
    total_variance = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    print(f"saved to {args.output_dir}; L0 = {(latents > 0).float().sum(-1).mean():.1f}")
    print(f"{'level width':>12} {'MSE':>10} {'var. explained':>15}")
    for width, recon in zip(sae.matryoshka_widths, levels, strict=True):
        mse = (recon - acts).pow(2).sum(-1).mean()
        print(f"{width:>12} {mse.item():>10.4f} {1 - (mse / total_variance).item():>15.3f}")


if __name__ == "__main__":
    main()
