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
  Hub models (``from_pretrained_no_processing``);
- a dataset folder written by ``save_to_disk`` is opened with
  ``load_from_disk`` (its ``train`` split if it holds several); any other
  folder (parquet, JSON, arrow files) with ``load_dataset``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from sae_lens import LanguageModelSAERunnerConfig
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading
from transformers import AutoModelForCausalLM, AutoTokenizer

#: files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write at the top of the folder
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
#: TransformerLens's weight processing, all off unless asked for (as SAELens loads models)
_PROCESSING = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
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
    cfg = loading.get_pretrained_model_config(
        str(folder),
        hf_cfg=hf_model.config.to_dict(),
        device=device,
        fold_ln=processing["fold_ln"],
        **config_kwargs,
    )
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    return model


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


def local_overrides(cfg: LanguageModelSAERunnerConfig[Any]) -> dict[str, Any]:
    """``override_model`` / ``override_dataset`` for the runner, for each local folder in ``cfg``.

    Empty when ``model_name`` and ``dataset_path`` are Hub names (or a
    ``model_class_name`` other than ``HookedTransformer``, which SAELens loads
    from a folder itself).
    """
    overrides: dict[str, Any] = {}
    if cfg.model_class_name == "HookedTransformer" and Path(cfg.model_name).is_dir():
        overrides["override_model"] = load_model_folder(
            cfg.model_name, cfg.llm_device or cfg.device, cfg.model_from_pretrained_kwargs
        )
    if cfg.dataset_path and Path(cfg.dataset_path).is_dir():
        overrides["override_dataset"] = load_dataset_folder(cfg.dataset_path, cfg.streaming)
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
