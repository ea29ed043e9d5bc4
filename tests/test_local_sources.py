"""Local model and dataset folders load as the runner would load them from the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
)

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.io.local_sources import (
    load_dataset_folder,
    load_model_folder,
    local_overrides,
    looks_like_a_path,
)

from .conftest import CONTEXT, HOOK, VOCAB, build_token_dataset, save_hf_model_folder

#: a tiny GPT-2 as a user builds one with the installed transformers: no n_ctx given
USERS_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": VOCAB, "n_positions": 128}


def save_users_gpt2(folder: Path) -> Path:
    """``GPT2Config(...)`` + ``save_pretrained``, exactly as a user writes it, with a tokenizer."""
    return save_hf_model_folder(folder, GPT2Config(**USERS_GPT2))


def save_long_tokens(folder: Path, context: int = 128, rows: int = 16) -> Path:
    """Random token ids, ``rows`` sequences of ``context``, as ``Dataset.save_to_disk`` writes them."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, context), generator=generator)
    datasets.Dataset.from_dict({"input_ids": tokens.tolist()}).save_to_disk(folder)
    return folder


def assert_computes_as_hugging_face(model, folder: Path, context: int) -> None:
    reference = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokens = torch.randint(0, VOCAB, (2, context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    return save_hf_model_folder(tmp_path / "model")


def test_a_model_folder_computes_what_the_hugging_face_model_does(model_folder: Path) -> None:
    model = load_model_folder(model_folder)
    reference = AutoModelForCausalLM.from_pretrained(model_folder, local_files_only=True)
    tokens = torch.randint(0, VOCAB, (3, CONTEXT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)
    assert HOOK in model.hook_dict
    assert model.tokenizer is not None
    assert model.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_folder).get_vocab()
    # unprocessed, as SAELens loads models: the layer norms keep their own weights
    assert "blocks.0.ln1.w" in model.state_dict()


def test_model_processing_can_be_asked_for_and_keeps_the_outputs(model_folder: Path) -> None:
    plain = load_model_folder(model_folder)
    folded = load_model_folder(model_folder, from_pretrained_kwargs={"fold_ln": True})
    assert "blocks.0.ln1.w" not in folded.state_dict()
    tokens = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens), plain(tokens), atol=1e-4, rtol=1e-4)


def test_a_folder_without_a_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"has no config\.json .*save_pretrained"):
        load_model_folder(tmp_path)


def test_dataset_folders_of_every_kind_give_the_tokens(tmp_path: Path) -> None:
    tokens = build_token_dataset()
    tokens.save_to_disk(tmp_path / "saved")
    assert load_dataset_folder(tmp_path / "saved")["input_ids"] == tokens["input_ids"]

    splits = datasets.DatasetDict({"train": tokens, "test": tokens.select(range(4))})
    splits.save_to_disk(tmp_path / "splits")
    assert load_dataset_folder(tmp_path / "splits")["input_ids"] == tokens["input_ids"]

    (tmp_path / "files").mkdir()
    tokens.to_parquet(str(tmp_path / "files" / "train.parquet"))
    assert load_dataset_folder(tmp_path / "files")["input_ids"] == tokens["input_ids"]
    streamed = load_dataset_folder(tmp_path / "files", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["input_ids"] for row in streamed] == tokens["input_ids"]


def test_saved_splits_without_train_are_refused(tmp_path: Path) -> None:
    datasets.DatasetDict({"test": build_token_dataset()}).save_to_disk(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"holds the splits \['test'\]; training reads 'train'"):
        load_dataset_folder(tmp_path / "splits")


def test_only_local_folders_are_overridden(runner_cfg, model_folder: Path, tmp_path: Path) -> None:
    assert local_overrides(runner_cfg(model_name="tiny-stories-1M", dataset_path="a/b")) == {}
    build_token_dataset().save_to_disk(tmp_path / "tokens")
    overrides = local_overrides(
        runner_cfg(model_name=str(model_folder), dataset_path=str(tmp_path / "tokens"))
    )
    assert overrides.keys() == {"override_model", "override_dataset"}
    assert HOOK in overrides["override_model"].hook_dict
    # SAELens loads AutoModelForCausalLM folders itself
    hf_class = runner_cfg(model_name=str(model_folder), model_class_name="AutoModelForCausalLM")
    assert local_overrides(hf_class) == {}


def test_a_gpt2_folder_written_by_todays_transformers_loads(tmp_path: Path) -> None:
    """Its config.json has no n_ctx, which TransformerLens's GPT-2 conversion reads."""
    folder = save_users_gpt2(tmp_path / "my-gpt2")
    assert "n_ctx" not in json.loads((folder / "config.json").read_text())
    model = load_model_folder(folder)
    assert (model.cfg.n_ctx, model.cfg.d_model, model.cfg.n_layers) == (128, 64, 2)
    assert model.cfg.model_name == "my-gpt2"
    assert model.cfg.tokenizer_name == str(folder)
    assert_computes_as_hugging_face(model, folder, context=128)
    # the folder itself is left as it was
    assert "n_ctx" not in json.loads((folder / "config.json").read_text())
    shorter = load_model_folder(folder, from_pretrained_kwargs={"n_ctx": 32})
    assert shorter.cfg.n_ctx == 32


def test_a_folder_named_like_a_hub_family_and_without_a_tokenizer_loads(tmp_path: Path) -> None:
    """TransformerLens picks Llama and Gemma by the path's text; the config decides here."""
    folder = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    model = load_model_folder(folder)
    assert model.tokenizer is None and model.cfg.tokenizer_name is None
    assert (model.cfg.n_ctx, model.cfg.original_architecture) == (64, "LlamaForCausalLM")
    assert_computes_as_hugging_face(model, folder, context=16)


def test_the_runner_trains_from_todays_folders_with_local_overrides(runner_cfg, tmp_path) -> None:
    """From Python: ``LanguageModelSAETrainingRunner(cfg, **local_overrides(cfg))``, a few steps."""
    cfg = runner_cfg(
        MatryoshkaTrainingSAEConfig(d_in=64, d_sae=64, k=4, matryoshka_widths=[16, 64]),
        model_name=str(save_users_gpt2(tmp_path / "my-gpt2")),
        hook_name="blocks.1.hook_resid_post",
        dataset_path=str(save_long_tokens(tmp_path / "tokens")),
        context_size=128,
        training_tokens=128 * 4,
        train_batch_size_tokens=128,
        n_eval_batches=1,
    )
    LanguageModelSAETrainingRunner(cfg, **local_overrides(cfg)).run()
    saved = SAE.load_from_disk(cfg.output_path)
    assert isinstance(saved, MatryoshkaSAE) and saved.matryoshka_widths == [16, 64]


@pytest.mark.parametrize(
    ("name", "is_path"),
    [
        ("./tokens", True),
        ("../tokens", True),
        ("/data/tokens", True),
        ("~/tokens", True),
        ("data/tiny/tokens", True),  # a Hub id has one / at most
        ("owner/tokens", False),  # a Hub id, or a folder: left to the Hub when it is not here
        ("gpt2", False),
        ("hf://datasets/owner/tokens", False),
        ("", False),
    ],
)
def test_what_can_only_be_a_local_path(name: str, is_path: bool) -> None:
    assert looks_like_a_path(name) is is_path
