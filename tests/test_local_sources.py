"""Local model and dataset folders load as the runner would load them from the Hub."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_lens_matryoshka.io.local_sources import (
    load_dataset_folder,
    load_model_folder,
    local_overrides,
)

from .conftest import CONTEXT, HOOK, VOCAB, build_token_dataset, save_hf_model_folder


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
