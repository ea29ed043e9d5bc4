"""Loading saved SAE folders with specific errors for damaged or hostile files.

SAELens's ``SAE.load_from_disk`` reads ``cfg.json`` and
``sae_weights.safetensors`` before any architecture's code runs, so a truncated
download surfaces as a Rust deserialisation error, an unknown architecture as
a bare ``KeyError``, and a malformed ``metadata`` as a ``TypeError``.
:func:`check_sae_folder` inspects the files first, reading only JSON (the
config, and the safetensors header, parsed by hand), and raises
:class:`SAEFileError` naming the file and what is wrong. A training
checkpoint's files are also checked against its completion marker (sizes,
and the SHA-256 of the files a loader reads: see ``checkpoints``), so a file
changed after the run wrote it is refused rather than loaded as other weights.
``SAE.load_from_disk`` runs it on every Matryoshka folder, and ``load_sae`` on
any folder (see ``loaders``). Nothing here can execute code from the files.
Config values and weight shapes are then checked by the Matryoshka classes
themselves, whichever loader is used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import DTYPE_MAP, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader
from sae_lens.registry import SAE_CLASS_REGISTRY
from safetensors import safe_open

from sae_lens_matryoshka.config import ARCHITECTURE, MatryoshkaSAEConfig, check_field_names
from sae_lens_matryoshka.io import checkpoints

#: bytes per element of the safetensors dtypes
_ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
#: tensors that hold SAE weights and so must be floating point
_WEIGHT_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "topk_threshold", "last_cutoff")
#: tensors whose saved precision exceeds the SAE dtype (see ``MatryoshkaTrainingSAE``; the
#: last is a penalised activation's target-L0 multiplier)
_THRESHOLD_NAMES = ("threshold", "topk_threshold", "last_cutoff", "target_l0_multiplier")
#: a header larger than this is not one SAELens wrote (it guards the read below)
_MAX_HEADER_BYTES = 100 * 2**20
#: the files of a checkpoint that loading an SAE from it reads (not the trainer's state)
_READ_BY_LOADERS = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)


class SAEFileError(ValueError):
    """A saved SAE file that cannot be loaded; the message names the file and the problem."""


def _check_regular_file(path: Path, missing: str) -> None:
    """Refuse a missing path, and at once a FIFO, device or folder (reading one could block forever)."""
    if not path.exists():
        raise SAEFileError(f"{path} is missing{missing}.")
    if not path.is_file():
        raise SAEFileError(
            f"{path} is not a regular file (a FIFO, device or directory); refusing to read it."
        )


def read_cfg(path: Path) -> dict[str, Any]:
    """``cfg.json`` as a dict, with its architecture, dtype and metadata checked."""
    _check_regular_file(
        path,
        f": a saved SAE folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}",
    )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise SAEFileError(f"{path} is not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        raise SAEFileError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "the file may be truncated."
        ) from error
    if not isinstance(cfg, dict):
        raise SAEFileError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    architecture = cfg.get("architecture")
    if architecture is None:
        raise SAEFileError(
            f"{path} has no 'architecture' field: SAELens would load it as a 'standard' SAE "
            f"and drop every field it does not know; a Matryoshka SAE's says {ARCHITECTURE!r}."
        )
    if architecture not in SAE_CLASS_REGISTRY:
        known = ", ".join(sorted(SAE_CLASS_REGISTRY))
        raise SAEFileError(
            f"{path} names architecture {architecture!r}, which is not registered with SAELens "
            f"(known: {known}). An SAE of another plugin needs that plugin imported first."
        )
    dtype = cfg.get("dtype")
    if dtype is not None and dtype not in DTYPE_MAP:
        raise SAEFileError(
            f"{path} has dtype {dtype!r}; expected one of {', '.join(sorted(DTYPE_MAP))}."
        )
    metadata = cfg.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise SAEFileError(
            f"{path}: 'metadata' must be a JSON object, got {type(metadata).__name__}."
        )
    return cfg


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file's size.

    A safetensors file is an 8-byte little-endian header length, a JSON header
    giving each tensor's dtype, shape and byte range, then the data. A file cut
    short (an interrupted download or copy) has byte ranges past its end.
    """
    _check_regular_file(path, "")
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SAEFileError(f"{path} is {size} bytes long: too short for a safetensors file.")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise SAEFileError(
                f"{path} announces a {header_bytes}-byte header but holds {size} bytes: "
                "it is truncated or not a safetensors file."
            )
        raw = file.read(header_bytes)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SAEFileError(f"{path} has a damaged safetensors header: {error}") from error
    if not isinstance(header, dict):
        raise SAEFileError(f"{path} has a damaged safetensors header (not a JSON object).")
    header.pop("__metadata__", None)
    ranges = sorted((_check_entry(path, name, info), name) for name, info in header.items())
    data_bytes = 0
    for (start, end), name in ranges:
        if start < data_bytes:
            raise SAEFileError(
                f"{path}: the bytes of tensor {name!r} ({start}-{end}) overlap another "
                "tensor's; the header is damaged."
            )
        data_bytes = end
    if 8 + header_bytes + data_bytes > size:
        raise SAEFileError(
            f"{path} is truncated: its header describes {8 + header_bytes + data_bytes} bytes, "
            f"the file holds {size}. Download or copy it again."
        )
    return header


def _check_entry(path: Path, name: str, info: Any) -> tuple[int, int]:
    """Check one tensor's header entry; returns where its data starts and ends."""
    if not isinstance(info, dict):
        raise SAEFileError(f"{path}: the header entry of {name!r} is not a JSON object.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ITEM_SIZES:
        raise SAEFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
    if name in _WEIGHT_NAMES and dtype not in _FLOAT_DTYPES:
        raise SAEFileError(
            f"{path}: tensor {name!r} is stored as {dtype}; SAE weights must be floating "
            f"point ({', '.join(_FLOAT_DTYPES)})."
        )
    valid_shape = isinstance(shape, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    )
    valid_offsets = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )
    if not (valid_shape and valid_offsets):
        raise SAEFileError(
            f"{path}: tensor {name!r} has a malformed shape {shape!r} or byte range {offsets!r}."
        )
    assert isinstance(shape, list) and isinstance(offsets, list)  # checked just above
    expected = math.prod(shape) * _ITEM_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SAEFileError(
            f"{path}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its "
            f"byte range holds {offsets[1] - offsets[0]}."
        )
    return int(offsets[0]), int(offsets[1])


def check_sae_folder(path: str | Path) -> dict[str, Any]:
    """Check a saved SAE folder's files without loading any weights; returns ``cfg.json``.

    Raises :class:`SAEFileError` for a missing or malformed ``cfg.json``, an
    architecture nobody registered, an unknown dtype, and a truncated, damaged
    or non-floating-point ``sae_weights.safetensors`` (and
    ``sparsity.safetensors`` when present); ``ValueError`` for a likely
    misspelt field of a Matryoshka ``cfg.json``, which SAELens's loader would
    drop without a word; and for a training checkpoint,
    ``checkpoints.IncompleteCheckpointError`` when it is torn and
    ``checkpoints.ChangedCheckpointError`` when a file it reads no longer has
    the SHA-256 its completion marker records (the trainer's state, which it
    does not read, is checked on size only: resuming checks its digest).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFileError(f"{folder} is not a directory; give the folder an SAE was saved to.")
    if checkpoints.is_checkpoint(folder):  # the digests of the files a loader reads
        checkpoints.check_complete(folder, read=_READ_BY_LOADERS)
    cfg = read_cfg(folder / SAE_CFG_FILENAME)
    if cfg.get("architecture") == ARCHITECTURE:
        check_field_names(MatryoshkaSAEConfig, cfg)
    read_safetensors_header(folder / SAE_WEIGHTS_FILENAME)
    if (folder / SPARSITY_FILENAME).exists():
        read_safetensors_header(folder / SPARSITY_FILENAME)
    return cfg


def check_finite_weights(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or Inf: every output of such an SAE would be poisoned."""
    for name, tensor in state_dict.items():
        if name in _WEIGHT_NAMES and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise SAEFileError(
                    f"{SAE_WEIGHTS_FILENAME}: {name} holds {bad} non-finite values (NaN/Inf) "
                    f"out of {tensor.numel()}; these weights cannot be used."
                )


def keep_threshold_precision(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens's disk loader, except that thresholds keep the precision they were saved in.

    SAELens casts every tensor to the config dtype, which rounds a bfloat16
    SAE's float32 JumpReLU thresholds and float64 BatchTopK EMA to 3 digits.
    """
    cfg_dict, state_dict = sae_lens_disk_loader(path, device, cfg_overrides)
    with safe_open(Path(path) / SAE_WEIGHTS_FILENAME, framework="pt", device=device) as file:
        for name in _THRESHOLD_NAMES:
            if name in state_dict:
                state_dict[name] = file.get_tensor(name)
    return cfg_dict, state_dict
