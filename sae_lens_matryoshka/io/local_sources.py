"""Models and token datasets from local folders, for training with no Hugging Face Hub.

SAELens's runner takes ``model_name`` and ``dataset_path`` as Hub names:
TransformerLens refuses a folder as a model name, ``datasets.load_dataset``
refuses a folder written by ``Dataset.save_to_disk``, and SAELens's tokenizer
check asks the Hub about any ``dataset_path``. ``local_overrides`` loads each
local folder itself and hands it to the runner as ``override_model`` /
``override_dataset``, so the same command line trains offline:

- a model folder as ``save_pretrained`` writes it (``config.json``, weights,
  tokenizer files), of an architecture TransformerLens converts, becomes a
  ``HookedTransformer`` loaded without weight processing, as SAELens loads
  Hub models (``from_pretrained_no_processing``); the folder may hold a
  config built with today's transformers, which lacks fields TransformerLens
  still reads (GPT-2's ``n_ctx``), and may have any name;
- a dataset folder written by ``save_to_disk`` is opened with
  ``load_from_disk`` (its ``train`` split if it holds several); any other
  folder (parquet, JSON, arrow files) with ``load_dataset``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoModelForCausalLM, AutoTokenizer

#: files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top of the folder
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
#: config fields TransformerLens reads under names today's transformers no longer writes ->
#: the fields, in order, that hold the same value in the configs it does write. GPT2Config
#: has no ``n_ctx`` field (the Hub's older config.json files carry one, kept when loaded), so
#: a GPT2Config built today saves ``n_positions`` alone, yet TransformerLens's GPT-2
#: conversion reads ``hf_config.n_ctx``.
LEGACY_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "n_ctx": ("n_positions", "max_position_embeddings"),
}
#: TransformerLens's weight processing, all off unless asked for (as SAELens loads models)
_PROCESSING = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


#: TransformerLens's advice to move from ``HookedTransformer`` to its ``TransformerBridge``:
#: SAELens's runner trains on HookedTransformer hooks, so nobody running it can follow it.
#: Dropped where this module builds the model, and inside a runner (``quiet``)
HOOKED_TRANSFORMER_DEPRECATION = (
    r"HookedTransformer(\.from_pretrained)? is deprecated and will be removed in "
)


def load_model_folder(
    folder: str | Path, device: str = "cpu", from_pretrained_kwargs: dict[str, Any] | None = None
) -> HookedTransformer:
    """A ``HookedTransformer`` of the Hugging Face model saved in ``folder``, unprocessed.

    Equal to what ``HookedTransformer.from_pretrained_no_processing`` gives for
    the same weights on the Hub (no layer-norm folding, no centring), which is
    how SAELens loads models to train SAEs on; ``from_pretrained_kwargs`` (the
    runner's ``model_from_pretrained_kwargs``) may turn processing on or set
    config fields such as ``n_ctx``. The tokenizer is loaded from the folder
    when it holds one.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder: it has no config.json (write one with "
            "model.save_pretrained(folder) and tokenizer.save_pretrained(folder))."
        )
    hf_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):  # a folder without tokenizer files
        tokenizer = None
    config_kwargs = dict(from_pretrained_kwargs or {})
    processing = {name: bool(config_kwargs.pop(name, False)) for name in _PROCESSING}
    cfg = _transformer_lens_config(
        folder, hf_model.config, device, processing["fold_ln"], config_kwargs
    )
    cfg.tokenizer_name = str(folder) if tokenizer is not None else None
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", HOOKED_TRANSFORMER_DEPRECATION, DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    return model


def with_legacy_fields(config: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """``config`` (a ``config.json``'s content) with each missing ``LEGACY_CONFIG_FIELDS`` entry.

    Each is taken from the first of its fields the loaded ``hf_config`` has
    (read as attributes, so a config's own aliases count: GPT-2's
    ``max_position_embeddings`` is its ``n_positions``); one none of them
    holds stays missing, for TransformerLens to name.
    """
    completed = dict(config)
    for legacy, sources in LEGACY_CONFIG_FIELDS.items():
        if legacy in completed:
            continue
        for source in sources:
            value = getattr(hf_config, source, None)
            if value is not None:
                completed[legacy] = value
                break
    return completed


def _transformer_lens_config(
    folder: Path, hf_config: Any, device: str, fold_ln: bool, config_kwargs: dict[str, Any]
) -> HookedTransformerConfig:
    """TransformerLens's config for the model in ``folder``, read from a completed copy of its config.json.

    TransformerLens reads the Hugging Face config again from the path it is
    given, by name, so fields can only reach it through a file: the copy adds
    what ``with_legacy_fields`` derives, and sits in a folder named
    ``model``, because TransformerLens also picks some architectures by the
    path's text (any path containing "llama" or "gemma" skips the config and
    fails), not by the config's ``architectures``.
    """
    config = json.loads((folder / "config.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        readable = Path(scratch) / "model"
        readable.mkdir()
        (readable / "config.json").write_text(json.dumps(with_legacy_fields(config, hf_config)))
        cfg = loading.get_pretrained_model_config(
            str(readable),
            hf_cfg=hf_config.to_dict(),
            device=device,
            fold_ln=fold_ln,
            **config_kwargs,
        )
    cfg.model_name = folder.name  # what TransformerLens names a folder: its last part
    return cfg


def load_dataset_folder(
    folder: str | Path, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """The training split of the token dataset in ``folder``.

    A ``save_to_disk`` folder is memory-mapped whatever ``streaming`` says (it
    is read lazily already); a folder of data files is streamed when asked.
    """
    folder = Path(folder)
    if any((folder / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
        saved = datasets.load_from_disk(str(folder))
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise ValueError(
                    f"{folder} holds the splits {list(saved)}; training reads 'train'."
                )
            return saved["train"]
        return saved
    loaded = datasets.load_dataset(str(folder), split="train", streaming=streaming)
    assert isinstance(loaded, datasets.Dataset | datasets.IterableDataset)
    return loaded


def looks_like_a_path(name: str) -> bool:
    """Whether a ``model_name`` or ``dataset_path`` can only mean a local path, not a Hub id.

    A Hub id is ``name`` or ``owner/name``: one ``/`` at most, never at the
    start. So ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c`` and a path with
    the platform's other separator are paths; ``data/tokens`` could be either
    and is left to the Hub (a missing one is then said as a Hub error). URLs
    (``hf://...``) are not paths.
    """
    if "://" in name:
        return False
    separators = [separator for separator in (os.sep, os.altsep) if separator not in (None, "/")]
    return (
        name.startswith(("./", "../", "/", "~"))
        or name.count("/") > 1
        or any(separator in name for separator in separators)
    )


def local_folder(name: str) -> Path | None:
    """``name`` as a folder on this machine (``~`` expanded), or None when no such folder exists."""
    folder = Path(name).expanduser()
    return folder if name and folder.is_dir() else None


def local_overrides(cfg: LanguageModelSAERunnerConfig[Any]) -> dict[str, Any]:
    """``override_model`` / ``override_dataset`` for the runner, for each local folder in ``cfg``.

    Empty when ``model_name`` and ``dataset_path`` are Hub names (or a
    ``model_class_name`` other than ``HookedTransformer``, which SAELens loads
    from a folder itself). The model loads here, before the runner is built:
    settings the runner checks before loading anything (``run_checks``,
    ``save_paths``) are best checked before calling this (the CLI does).
    """
    overrides: dict[str, Any] = {}
    model_folder = local_folder(cfg.model_name)
    if cfg.model_class_name == "HookedTransformer" and model_folder is not None:
        overrides["override_model"] = load_model_folder(
            model_folder, cfg.llm_device or cfg.device, cfg.model_from_pretrained_kwargs
        )
    dataset_folder = local_folder(cfg.dataset_path)
    if dataset_folder is not None:
        overrides["override_dataset"] = load_dataset_folder(dataset_folder, cfg.streaming)
    return overrides


class _OverrideNotice(logging.Filter):
    """Drops SAELens's notice that an override makes a run unreproducible from its config."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("You just passed in a")


@contextlib.contextmanager
def overrides_named_by_config() -> Iterator[None]:
    """Build the runner with ``local_overrides`` without SAELens saying they are not in the config.

    They are: ``model_name`` and ``dataset_path`` name the folders they came from.
    """
    notice, sae_lens_logger = _OverrideNotice(), logging.getLogger("sae_lens")
    sae_lens_logger.addFilter(notice)
    try:
        yield
    finally:
        sae_lens_logger.removeFilter(notice)
