"""What the benchmarks share: a tiny random model with tokens, a runner config for it, memory readings.

Nothing is downloaded: the model is a randomly initialised ``HookedTransformer``
and the data random token ids, so the benchmarks run offline anywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig


def tiny_model_and_tokens(
    n_layers: int, d_model: int, n_heads: int, vocab: int, context: int, device: str = "cpu"
) -> tuple[HookedTransformer, Dataset]:
    """A random ``HookedTransformer`` (4 * d_model MLP) and 512 random sequences of its vocabulary."""
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_ctx=context,
            d_head=d_model // n_heads,
            n_heads=n_heads,
            d_mlp=4 * d_model,
            d_vocab=vocab,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
    ).to(device)
    tokens = torch.randint(0, vocab, (512, context), generator=torch.Generator().manual_seed(0))
    return model, Dataset.from_dict({"input_ids": tokens.tolist()})


def runner_config(
    sae: Any, hook_name: str, context: int, output: str, **fields: Any
) -> LanguageModelSAERunnerConfig[Any]:
    """A runner config for the tiny model's pretokenized data, without logging or checkpoints."""
    return LanguageModelSAERunnerConfig(
        sae=sae,
        model_name="tiny-random",
        hook_name=hook_name,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=context,
        prepend_bos=False,
        store_batch_size_prompts=16,
        output_path=output,
        checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
        **fields,
    )


def process_memory_mib(field: str = "VmRSS") -> float:
    """A field of ``/proc/self/status`` in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (its peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")
