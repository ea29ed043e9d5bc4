"""Offline fixtures for the ecosystem clients' tests (run by ``make test-clients``).

These tests run in ``.venv-clients`` with ``--confcutdir=tests/clients``, so
``tests/conftest.py`` is not loaded: it imports the toy module, whose
``sae_lens.synthetic`` needs TransformerLens 3, and the clients pin TransformerLens
2. Nothing here imports a client; each test module skips itself without its client.

Everything is built here, nothing downloaded: a tiny random
``HookedSAETransformer``, a word-level tokenizer for it (SAEDashboard decodes
tokens into its pages), pretokenized sequences, and a Matryoshka SAE trained
by SAELens's runner on the model, saved and loaded back as a user would.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    HookedSAETransformer,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from transformer_lens import HookedTransformerConfig

import sae_lens_matryoshka  # noqa: F401  (registers "matryoshka")
from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig

D_MODEL = 16
CONTEXT = 16
VOCAB = 64
HOOK = "blocks.0.hook_resid_post"
WIDTHS = [8, 24, 64]


def word_tokenizer() -> Any:
    """A word-level tokenizer over the model's vocabulary ``w0 ... w62`` plus an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="w0",
    )


@pytest.fixture(scope="session")
def model() -> HookedSAETransformer:
    model = HookedSAETransformer(
        HookedTransformerConfig(
            n_layers=1,
            d_model=D_MODEL,
            n_ctx=CONTEXT,
            d_head=4,
            n_heads=4,
            d_mlp=32,
            d_vocab=VOCAB,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
    )
    # set directly: HookedTransformer's set_tokenizer looks its name up on the Hub
    model.tokenizer = word_tokenizer()
    return model


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (64, CONTEXT), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def token_dataset(tokens: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"input_ids": tokens.tolist()})


@pytest.fixture(scope="session")
def sae_folder(
    model: HookedSAETransformer, token_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A BatchTopK Matryoshka SAE (levels 8 / 24 / 64) trained by SAELens's runner, as saved."""
    folder = tmp_path_factory.mktemp("matryoshka")
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaTrainingSAEConfig(
            d_in=D_MODEL, d_sae=WIDTHS[-1], matryoshka_widths=WIDTHS, k=4
        ),
        model_name="tiny-random",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        context_size=CONTEXT,
        training_tokens=64 * 60,
        train_batch_size_tokens=64,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,
        prepend_bos=False,
        lr=3e-3,
        output_path=str(folder),
        logger=LoggingConfig(log_to_wandb=False),
        device="cpu",
        seed=0,
        verbose=False,
    )
    LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=model).run()
    return folder


@pytest.fixture
def sae(sae_folder: Path) -> MatryoshkaSAE:
    """The trained SAE as ``SAE.load_from_disk`` gives it, fresh for each test (tools change it)."""
    loaded = SAE.load_from_disk(sae_folder)
    assert isinstance(loaded, MatryoshkaSAE)
    return loaded


def hook_activations(model: HookedSAETransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The model's activations at the SAE's hook, ``[batch, seq, d_model]``."""
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    return cache[HOOK]
