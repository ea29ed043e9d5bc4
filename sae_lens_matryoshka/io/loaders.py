"""Every loader a user reaches gives the same SAE, and refuses the same damaged files.

A Matryoshka dictionary reaches users in two forms: the inference form the
runner saves (``MatryoshkaSAE``'s ``cfg.json`` and folded weights) and the
training form of checkpoints (the training config, unfolded weights,
BatchTopK's threshold statistics, the prefix sampler's state). Turning the
training form into the inference form happens in exactly one place,
:func:`inference_form`: ``save_inference_model``, :func:`to_inference` and
every loader below call it, so a checkpoint loaded for inference is the SAE
its run would have saved at that step, whichever loader read it.

SAELens's own loaders are wrapped for Matryoshka folders only, the way
``checkpoints`` wraps SAELens's checkpoint routine (nothing is copied):

- ``SAE.load_from_disk`` first runs :func:`~sae_lens_matryoshka.io.safe_loading.check_sae_folder`
  (a FIFO or device in place of a file is refused at once, a torn or unmarked
  checkpoint names the latest complete one, a damaged safetensors file says
  what is wrong), then reads a training-form folder through
  :func:`inference_form`. ``MatryoshkaTrainingSAE.load_from_disk`` gets the
  checks but keeps the training form (it resumes from it).
- ``SAE.from_pretrained``'s SAELens-format Hub loader reads a training-form
  folder through :func:`inference_form` too, and when the repo holds the
  checkpoint's completion marker (a checkpoint folder uploaded whole), refuses
  a downloaded file whose SHA-256 is not the one the marker records
  (:func:`~sae_lens_matryoshka.io.checkpoints.check_digests`).

Folders of any other architecture go to SAELens's code untouched.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from sae_lens import SAE, TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_LOADERS,
    PretrainedSaeDiskLoader,
    PretrainedSaeHuggingfaceLoader,
    sae_lens_disk_loader,
)

from sae_lens_matryoshka.config import (
    ARCHITECTURE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE, derived_sae
from sae_lens_matryoshka.io import checkpoints
from sae_lens_matryoshka.io.safe_loading import check_sae_folder, keep_threshold_precision
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

StateDict = dict[str, torch.Tensor]

#: config fields only the training form has: a ``cfg.json`` holding any is a training save
_TRAINING_ONLY_FIELDS = frozenset(
    spec.name for spec in fields(MatryoshkaTrainingSAEConfig)
) - frozenset(spec.name for spec in fields(MatryoshkaSAEConfig))


def inference_form(sae: MatryoshkaTrainingSAE) -> tuple[dict[str, Any], StateDict]:
    """The ``cfg.json`` dict and weights of the ``MatryoshkaSAE`` that ``sae`` saves as.

    The same two steps as SAELens's ``save_inference_model``: the training
    SAE's ``process_state_dict_for_saving_inference`` (decoder norms folded,
    the activation's state converted, e.g. BatchTopK's threshold statistic
    chosen by ``inference_threshold``) and its config's inference dict.
    """
    state = {name: tensor.detach().clone() for name, tensor in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    return sae.cfg.get_inference_sae_cfg_dict(), state


def to_inference(sae: MatryoshkaTrainingSAE) -> MatryoshkaSAE:
    """The ``MatryoshkaSAE`` that ``sae.save_inference_model`` would write, in memory."""
    cfg_dict, state = inference_form(sae)
    inference = derived_sae(MatryoshkaSAEConfig.from_dict(cfg_dict))
    inference.load_state_dict(state)
    return inference


def is_training_form(cfg_dict: dict[str, Any]) -> bool:
    """Whether a Matryoshka ``cfg.json`` is a training save (a checkpoint, ``save_model``)."""
    return not _TRAINING_ONLY_FIELDS.isdisjoint(cfg_dict)


def _training_to_inference(
    cfg_dict: dict[str, Any], state_dict: StateDict
) -> tuple[dict[str, Any], StateDict]:
    """A training-form folder's config and weights, as :func:`inference_form` turns them.

    The training SAE is built on the meta device and given the loaded tensors,
    so no second copy of the weights is allocated.
    """
    cfg = MatryoshkaTrainingSAEConfig.from_dict(cfg_dict)
    device, cfg.device = cfg.device, "meta"
    sae = MatryoshkaTrainingSAE(cfg)
    sae.cfg.device = device
    sae.process_state_dict_for_loading(state_dict)
    sae.load_state_dict(state_dict, assign=True)
    return inference_form(sae)


def _reading_inference_form(converter: PretrainedSaeDiskLoader) -> PretrainedSaeDiskLoader:
    """``converter``, with a training-form Matryoshka folder turned into the inference form."""

    def convert(
        path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], StateDict]:
        cfg_dict, state_dict = converter(path, device, cfg_overrides)
        if is_training_form(cfg_dict):
            return _training_to_inference(cfg_dict, state_dict)
        return cfg_dict, state_dict

    return convert


def is_matryoshka_folder(path: str | Path) -> bool:
    """Whether ``path`` holds (or was being written as) a Matryoshka SAE.

    Decided from ``cfg.json``'s architecture, or for a folder without a
    readable one, from the plugin's own checkpoint files (a staging folder, a
    completion marker, latent-shard parts). Reads nothing but ``cfg.json``,
    and that only when it is a regular file.
    """
    folder = Path(path)
    if checkpoints.written_by_plugin(folder):
        return True
    cfg_path = folder / SAE_CFG_FILENAME
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("architecture") == ARCHITECTURE


def check_hub_checkpoint(repo_id: str, folder_name: str, force_download: bool = False) -> None:
    """Refuse a checkpoint's files downloaded from the Hub unless they have its marker's digests.

    SAELens's Hub loader downloads ``cfg.json``, the weights and the sparsity,
    not the completion marker; a checkpoint folder uploaded whole has one
    beside them. A repo without it (SAELens's upload sends none) passes.
    """
    try:
        marker = hf_hub_download(
            repo_id=repo_id,
            filename=f"{folder_name}/{checkpoints.MARKER}",
            force_download=force_download,
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):  # none, or offline and not cached
        return
    downloaded = {}
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME):
        path = try_to_load_from_cache(repo_id, f"{folder_name}/{name}")
        if isinstance(path, str):
            downloaded[name] = path
    checkpoints.check_digests(f"{repo_id}/{folder_name}", marker, downloaded)


def load_sae(path: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE[Any]:
    """Any saved SAE folder, its files checked first (:func:`check_sae_folder`), any architecture.

    For a Matryoshka folder this is ``SAE.load_from_disk``, which checks
    them itself; other architectures get the same checks here, before SAELens
    reads anything.
    """
    if not is_matryoshka_folder(path):
        check_sae_folder(path)
    return SAE.load_from_disk(path, device=device, dtype=dtype)


def install() -> None:
    """Wrap SAELens's ``SAE.load_from_disk`` and SAELens-format Hub loader as described above.

    Other architectures behave exactly as before. Idempotent.
    """
    if getattr(SAE, "_matryoshka_loaders", False):
        return
    load_from_disk = SAE.load_from_disk.__func__
    hub_loader = NAMED_PRETRAINED_SAE_LOADERS["sae_lens"]

    @functools.wraps(load_from_disk)
    def checked_load_from_disk(
        cls: type[SAE[Any]],
        path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        converter: PretrainedSaeDiskLoader = sae_lens_disk_loader,
        fold_W_dec_norm: bool = False,
    ) -> SAE[Any]:
        if is_matryoshka_folder(path):
            check_sae_folder(path)
            if converter is sae_lens_disk_loader:
                # thresholds keep the precision they were saved in
                converter = keep_threshold_precision
            if not issubclass(cls, TrainingSAE):
                converter = _reading_inference_form(converter)
        loaded: SAE[Any] = load_from_disk(cls, path, device, dtype, converter, fold_W_dec_norm)
        return loaded

    hub_loader_signature = inspect.signature(hub_loader)

    @functools.wraps(hub_loader)
    def hub_loader_reading_inference_form(
        *args: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], StateDict, torch.Tensor | None]:
        cfg_dict, state_dict, log_sparsity = hub_loader(*args, **kwargs)
        if cfg_dict.get("architecture") == ARCHITECTURE and is_training_form(cfg_dict):
            call = hub_loader_signature.bind(*args, **kwargs)
            call.apply_defaults()
            check_hub_checkpoint(
                call.arguments["repo_id"],
                call.arguments["folder_name"],
                bool(call.arguments.get("force_download", False)),
            )
            cfg_dict, state_dict = _training_to_inference(cfg_dict, state_dict)
        return cfg_dict, state_dict, log_sparsity

    SAE.load_from_disk = classmethod(checked_load_from_disk)
    loader: PretrainedSaeHuggingfaceLoader = hub_loader_reading_inference_form
    NAMED_PRETRAINED_SAE_LOADERS["sae_lens"] = loader
    SAE._matryoshka_loaders = True
