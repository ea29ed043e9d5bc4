"""Moving Matryoshka dictionaries between formats.

Out:

- ``export_portable``: a folder in a plain SAELens architecture (``jumprelu``,
  ``topk`` or ``standard``) that loads without this plugin and computes the
  same outputs; the levels are kept in its metadata.

In, each as a level-aware ``MatryoshkaSAE`` whose outputs equal the source's:

- ``from_saelens``: a SAELens SAE object or saved folder (JumpReLU, TopK,
  standard), such as SAELens's own ``matryoshka_batchtopk`` saves, which are
  flat JumpReLU SAEs with the widths in their metadata.
- ``from_saelens_release``: an SAE of a published SAELens release (e.g.
  ``gemma-2-2b-res-matryoshka-dc``), through SAELens's own ``from_pretrained``.
- ``from_dictionary_learning``: a dictionary_learning / SAEBench checkpoint
  (``ae.pt`` + ``config.json``) of ``MatryoshkaBatchTopKSAE``,
  ``BatchTopKSAE`` or ``AutoEncoderTopK``.
- ``from_sparsify``: an EleutherAI sparsify TopK ``SparseCoder`` folder
  (``cfg.json`` + ``sae.safetensors``).

The levels are ``matryoshka_widths`` when given, else what the source records.
SAELens SAEs without recorded levels are refused (a release published as
Matryoshka would silently lose them); plain TopK / BatchTopK files become one
level. Every tensor is checked before use: a missing one, a shape other than
the source's config gives, integer values or NaN/Inf is refused naming the
file. Only safetensors, JSON and ``torch.load(weights_only=True)`` are read:
no loading path executes code from the files.

Other libraries' files reach users copied, downloaded and hand-edited, so a
damaged one is expected, not exceptional: an empty, truncated or garbled
``ae.pt`` / ``sae.safetensors``, a config that is not JSON, lacks a field or
gives one of the wrong type, a folder where a file belongs. Each is one
:class:`~sae_lens_matryoshka.io.safe_loading.SAEFileError` (a ``ValueError``)
naming the file, what was expected there, what was found and what to do, not
the ``JSONDecodeError``, ``EOFError``, ``UnpicklingError`` or
``AttributeError`` the reading code would raise several frames away from the
file. A file that is not there is a ``FileNotFoundError``.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file

from sae_lens_matryoshka.config import MatryoshkaSAEConfig, validate_widths
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
from sae_lens_matryoshka.io.hub_misses import hub_misses_named
from sae_lens_matryoshka.io.loaders import to_inference
from sae_lens_matryoshka.io.safe_loading import SAEFileError, read_safetensors_header
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

#: our inference activation -> the plain SAELens classes that compute it
_PORTABLE: dict[str, tuple[type[SAE[Any]], type[SAEConfig]]] = {
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
    "topk": (TopKSAE, TopKSAEConfig),
    "relu": (StandardSAE, StandardSAEConfig),
}


def _as_inference(sae: MatryoshkaSAE | MatryoshkaTrainingSAE) -> MatryoshkaSAE:
    return to_inference(sae) if isinstance(sae, MatryoshkaTrainingSAE) else sae


def to_portable(sae: MatryoshkaSAE | MatryoshkaTrainingSAE) -> SAE[Any]:
    """A plain SAELens SAE (JumpReLU / TopK / standard) with the same outputs.

    The levels survive as ``metadata.matryoshka_widths``, which ``from_saelens``
    reads back.
    """
    sae = _as_inference(sae)
    activation = sae.cfg.activation
    sae_class, cfg_class = _PORTABLE[activation]
    # SAELens's TopK can measure in unit-norm decoder units too; the others get the norms folded
    sae, decoder_fields = sae.decoder.saelens_form(sae, cfg_class)
    cfg = cfg_class(
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        dtype=sae.cfg.dtype,
        device=sae.cfg.device,
        apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input,
        normalize_activations=sae.cfg.normalize_activations,
        reshape_activations=sae.cfg.reshape_activations,
        metadata=copy.deepcopy(sae.cfg.metadata),
        **decoder_fields,
        **({"k": sae.cfg.k} if activation == "topk" else {}),
    )
    cfg.metadata.matryoshka_widths = list(sae.matryoshka_widths)
    portable = sae_class(cfg)
    portable.load_state_dict({name: t.detach().clone() for name, t in sae.state_dict().items()})
    return portable


def export_portable(sae: MatryoshkaSAE | MatryoshkaTrainingSAE, path: str | Path) -> Path:
    """Write ``sae`` as a plain SAELens folder that loads without this plugin."""
    path = Path(path)
    to_portable(sae).save_model(path)
    return path


#: our tensor -> (its name in the source, whether the source stores it transposed)
_Layout = Mapping[str, tuple[str, bool]]

#: SAELens's names and shapes (and MatryoshkaSAE's)
_SAELENS_LAYOUT: _Layout = {
    name: (name, False) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
}
#: dictionary_learning's BatchTopKSAE and AutoEncoderTopK: nn.Linear layers, weights [out, in]
_LINEAR_LAYOUT: _Layout = {
    **_SAELENS_LAYOUT,
    "W_enc": ("encoder.weight", True),
    "b_enc": ("encoder.bias", False),
    "W_dec": ("decoder.weight", True),
}
#: sparsify's SparseCoder: an nn.Linear encoder, and W_dec as a [num_latents, d_in] parameter
_SPARSIFY_LAYOUT: _Layout = {**_LINEAR_LAYOUT, "W_dec": ("W_dec", False)}

#: the activations imports produce
_ImportedActivation = Literal["jumprelu", "topk"]

#: dictionary_learning classes read -> the activation that reproduces their ``encode``
_DICTIONARY_LEARNING_ACTIVATIONS: dict[str, _ImportedActivation] = {
    # BatchTopK-trained: at inference (use_threshold=True) a latent fires above
    # one learned threshold, which becomes every latent's JumpReLU threshold
    "MatryoshkaBatchTopKSAE": "jumprelu",
    "BatchTopKSAE": "jumprelu",
    # per-token top-k (its encode defaults to use_threshold=False)
    "AutoEncoderTopK": "topk",
}

#: ``cfg.json`` as sparsify's ``SparseCoder.save_to_disk`` writes it, with the fields read here
_SPARSIFY_CFG = (
    "sparsify's SparseCoder.save_to_disk writes it beside sae.safetensors, a JSON object of "
    'the SparseCoderConfig and d_in: {"d_in", "k", "num_latents", "expansion_factor", ...}'
)
#: ``sae.safetensors``, likewise
_SPARSIFY_WEIGHTS = (
    "sparsify's SparseCoder.save_to_disk writes the coder's weights there, beside cfg.json"
)

#: sparsify settings whose SparseCoder a MatryoshkaSAE cannot compute, and why
_SPARSIFY_UNSUPPORTED = {
    "transcode": "it is a transcoder (it predicts another module's output from this one's "
    "input, which it does not centre by b_dec)",
    "skip_connection": "it adds a linear skip connection (x @ W_skip.T) to its output",
}


#: what to do when weights and the config that sizes them disagree, for files
_MISMATCH_REMEDY = (
    "the weights and the config are not of the same SAE: use the pair one run wrote together"
)


def _import(
    state: Mapping[str, Any],
    layout: _Layout,
    cfg: MatryoshkaSAEConfig,
    source: str,
    config: str,
    remedy: str = _MISMATCH_REMEDY,
) -> MatryoshkaSAE:
    """A ``MatryoshkaSAE`` of ``cfg`` holding the source's weights, each checked first.

    A tensor that is missing, not a tensor, not floating point, has another
    shape than ``cfg`` needs, or holds NaN/Inf is refused with a message
    naming ``source`` (where the weights come from) and ``config`` (what sets
    their shapes), in the source's own tensor names, and ``remedy``: a wrong
    or damaged file should not surface as a bare ``load_state_dict`` or
    ``AttributeError``, nor load and compute garbage (integer weights would
    be cast silently).
    """
    sae = MatryoshkaSAE(cfg)
    shapes = {name: tensor.shape for name, tensor in sae.state_dict().items()}
    missing = [layout[name][0] for name in shapes if layout[name][0] not in state]
    if missing:
        held = sorted(str(key) for key in state)
        shown = f"{held[:12]}{' ...' if len(held) > 12 else ''}"
        raise SAEFileError(
            f"{source} lacks {missing}, which {config} requires; it holds {shown}: {remedy}."
        )
    weights = {}
    for name, shape in shapes.items():
        theirs, transposed = layout[name]
        tensor, expected = state[theirs], shape[::-1] if transposed else shape
        if not isinstance(tensor, torch.Tensor):
            raise SAEFileError(
                f"{source}: {theirs} is a {type(tensor).__name__}, expected a tensor of shape "
                f"{list(expected)}: {remedy}."
            )
        if tensor.shape != expected:
            raise SAEFileError(
                f"{source}: {theirs} has shape {list(tensor.shape)}, but {config} needs "
                f"{list(expected)}: {remedy}."
            )
        if not tensor.is_floating_point():
            raise SAEFileError(
                f"{source}: {theirs} holds {tensor.dtype} values, expected floating-point "
                f"weights (integers would be cast and compute garbage): {remedy}."
            )
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise SAEFileError(
                f"{source}: {theirs} holds {bad} non-finite values (NaN/Inf) out of "
                f"{tensor.numel()}; these weights cannot be used."
            )
        weights[name] = tensor.T if transposed else tensor
    sae.load_state_dict(weights)
    return sae


def _file_config(
    d_in: int,
    d_sae: int,
    widths: list[int],
    activation: _ImportedActivation,
    k: int | None,
    device: str,
    dtype: str,
    metadata: dict[str, Any],
) -> MatryoshkaSAEConfig:
    """The config of an SAE imported from another library's files, ``metadata`` recording them."""
    cfg = MatryoshkaSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        device=device,
        matryoshka_widths=validate_widths(widths, d_sae, "matryoshka_widths"),
        activation=activation,
        k=k,
    )
    cfg.metadata = SAEMetadata(**{**cfg.metadata.to_dict(), **metadata})
    return cfg


#: what to do about a damaged file: nothing in it can be trusted, so get it again
_COPY_AGAIN = "copy it again from the run that wrote it (or download it again)"

#: JSON's names for what ``json.loads`` returns
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_file(path: Path, expected: str, hint: str = "") -> None:
    """Refuse a missing path (``FileNotFoundError``), and at once a folder, FIFO or device.

    ``expected`` says what writes the file and what it holds; ``hint``
    (e.g. the checkpoint folders found nearby) is added to a missing file's
    message. Reading a FIFO could block forever, and reading a folder fails
    with an error that does not say which file was expected.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {expected}.{hint}")
    if not path.is_file():
        found = "a folder" if path.is_dir() else "not a regular file (a FIFO or device)"
        raise SAEFileError(
            f"{path} is {found}; {expected}. Put that file at this path, or give the "
            "folder that holds it."
        )


def _read_json(path: Path, expected: str, hint: str = "") -> dict[str, Any]:
    """The JSON object at ``path``, or one error saying what the file should hold and what it holds.

    ``expected`` says what writes the file and what it holds.
    """
    _check_file(path, expected, hint)
    raw = path.read_bytes()
    if not raw.strip():
        raise SAEFileError(
            f"{path} is empty ({len(raw)} bytes); {expected}. The write was "
            f"interrupted or the copy cut short: {_COPY_AGAIN}."
        )
    try:
        content = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise SAEFileError(
            f"{path} is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}); "
            f"{expected}. It is damaged or another file: {_COPY_AGAIN}."
        ) from error
    except json.JSONDecodeError as error:
        raise SAEFileError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}; the file is {len(raw)} bytes); {expected}. It is truncated "
            f"or damaged: {_COPY_AGAIN}."
        ) from error
    if not isinstance(content, dict):
        raise SAEFileError(
            f"{path} holds a JSON {_json_type(content)}; {expected}. Is it the right file?"
        )
    return content


def _fields(
    config: Mapping[str, Any], names: tuple[str, ...], where: str, expected: str
) -> list[Any]:
    """The values of ``names`` in ``config``, refusing it when any is missing.

    ``expected`` says what writes ``config`` and what it holds, for the message.
    """
    missing = [name for name in names if config.get(name) is None]
    if missing:
        present = sorted(config)
        raise SAEFileError(
            f"{where} lacks {missing}; it has {present[:20]}{' ...' if len(present) > 20 else ''}: "
            f"{expected}. It is not such a file, or was edited: {_COPY_AGAIN}."
        )
    return [config[name] for name in names]


def _whole(value: Any, name: str, where: str, least: int = 1) -> int:
    """``value`` as a count: a JSON integer of at least ``least``, else one error naming the field.

    A string ``"24"`` or a float would otherwise reach tensor code as a size,
    or be repeated as a string (``"8" * 3``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SAEFileError(
            f"{where}: {name} is {json.dumps(value)} (a JSON {_json_type(value)}), expected a "
            f"whole number of at least {least}. Fix the field, or {_COPY_AGAIN}."
        )
    return value


def _subfolders_with(folder: Path, filename: str) -> str:
    """A sentence naming ``folder``'s subfolders that hold ``filename`` (for a missing file's message)."""
    if not folder.is_dir():
        return ""
    found = sorted(child.name for child in folder.iterdir() if (child / filename).is_file())
    if not found:
        return ""
    shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
    return f" {folder} holds {len(found)} folders that do ({shown}): give one of them."


def _widths_from_metadata(sae: SAE[Any]) -> list[int] | None:
    metadata = sae.cfg.metadata
    if metadata.get("matryoshka_widths") is not None:
        return list(metadata["matryoshka_widths"])
    details = metadata.get("training_architecture_details") or {}
    if details.get("matryoshka_widths"):
        return list(details["matryoshka_widths"])
    return None


def _level_aware(sae: SAE[Any], matryoshka_widths: list[int] | None, source: str) -> MatryoshkaSAE:
    """``sae`` as a ``MatryoshkaSAE``, its levels given or read from its metadata."""
    activation = next(
        (name for name, (cls, _) in _PORTABLE.items() if type(sae) is cls),
        "matryoshka" if isinstance(sae, MatryoshkaSAE) else None,
    )
    if activation is None:
        supported = ", ".join(cls.__name__ for cls, _ in _PORTABLE.values())
        raise ValueError(
            f"Cannot read a {type(sae).__name__} (architecture {sae.cfg.architecture()!r}) as a "
            f"Matryoshka SAE; supported: {supported} and MatryoshkaSAE."
        )
    widths = matryoshka_widths if matryoshka_widths is not None else _widths_from_metadata(sae)
    if widths is None:
        raise ValueError(
            f"{source} ({type(sae).__name__}) records no Matryoshka levels: its config has no "
            "matryoshka_widths, nor its metadata matryoshka_widths or "
            "training_architecture_details.matryoshka_widths; pass matryoshka_widths=[...] "
            f"(strictly increasing, ending at d_sae={sae.cfg.d_sae})."
        )
    cfg_dict = {
        **{
            name: getattr(sae.cfg, name)
            for name in (
                "d_in",
                "d_sae",
                "dtype",
                "device",
                "apply_b_dec_to_input",
                "normalize_activations",
                "reshape_activations",
            )
        },
        "metadata": SAEMetadata(**copy.deepcopy(sae.cfg.metadata.to_dict())),
        "matryoshka_widths": validate_widths(widths, sae.cfg.d_sae, "matryoshka_widths"),
    }
    # only TopK (and Matryoshka) configs carry k and the decoder-norm rescaling
    cfg_dict |= {
        "activation": sae.cfg.activation if activation == "matryoshka" else activation,
        "k": getattr(sae.cfg, "k", None),
        "rescale_acts_by_decoder_norm": getattr(sae.cfg, "rescale_acts_by_decoder_norm", False),
    }
    config = f"its config (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae})"
    return _import(
        sae.state_dict(), _SAELENS_LAYOUT, MatryoshkaSAEConfig(**cfg_dict), source, config
    )


def from_saelens(
    sae: SAE[Any] | str | Path, matryoshka_widths: list[int] | None = None
) -> MatryoshkaSAE:
    """A level-aware ``MatryoshkaSAE`` from a SAELens SAE or saved folder, with equal outputs.

    The widths come from ``matryoshka_widths`` or, when not given, from the
    SAE's metadata: SAELens's ``matryoshka_batchtopk`` records them under
    ``training_architecture_details``, ``export_portable`` under
    ``matryoshka_widths``. Supported: JumpReLU, TopK and standard (ReLU) SAEs.
    """
    source = f"the given {type(sae).__name__}" if isinstance(sae, SAE) else str(sae)
    if not isinstance(sae, SAE):
        sae = SAE.load_from_disk(sae)
    return _level_aware(sae, matryoshka_widths, source)


def from_saelens_release(
    release: str,
    sae_id: str,
    matryoshka_widths: list[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> MatryoshkaSAE:
    """A level-aware ``MatryoshkaSAE`` of a published SAELens release, with equal outputs.

    Loads through SAELens's own ``SAE.from_pretrained(release, sae_id)``
    (release registry, Hub download or cache, the release's converter), so
    ``release`` may also be a Hub repo id, as there. The widths are
    ``matryoshka_widths`` when given, else the ``matryoshka_widths`` of the
    release's ``cfg.json`` or metadata (``training_architecture_details`` for
    SAELens's ``matryoshka_batchtopk`` saves); a release recording none, such
    as SAELens's conversions of dictionary_learning checkpoints, needs them given.

    A file neither in the local Hugging Face cache nor downloadable
    (``HF_HUB_OFFLINE=1``, no network) fails as ``HubFileNotCached`` naming
    this call, the repo, the file and the download that brings it, whichever
    of SAELens's converters the release uses.
    """
    directory = get_pretrained_saes_directory()
    repo_id = directory[release].repo_id if release in directory else release
    with hub_misses_named(f"from_saelens_release({release!r}, {sae_id!r})", repo_id):
        sae, cfg_dict, _ = SAE.from_pretrained_with_cfg_and_sparsity(
            release, sae_id, device=device, dtype=dtype
        )
    if matryoshka_widths is None:
        # SAELens keeps only the fields its config class knows; cfg_dict has them all
        matryoshka_widths = cfg_dict.get("matryoshka_widths")
    return _level_aware(sae, matryoshka_widths, f"SAELens release {release!r}, sae_id {sae_id!r}")


def _group_widths(
    state: Mapping[str, Any], trainer: dict[str, Any], weights_path: Path, config_path: Path
) -> list[int]:
    """A ``MatryoshkaBatchTopKSAE``'s levels: its cumulative ``group_sizes``.

    The class saves them as a buffer; checkpoints of older versions have them
    only in the trainer's config.
    """
    in_weights = "group_sizes" in state
    raw = state["group_sizes"] if in_weights else trainer.get("group_sizes")
    source = weights_path if in_weights else config_path
    if raw is None:
        raise SAEFileError(
            f"Neither {weights_path} nor {config_path} gives the group_sizes of the levels "
            "(MatryoshkaBatchTopKSAE saves them as a buffer, its trainer in its config): pass "
            "matryoshka_widths=[...] to declare them."
        )
    integral = isinstance(raw, torch.Tensor) and raw.dim() == 1 and not raw.is_floating_point()
    group_sizes = raw.tolist() if integral else raw
    if not (
        isinstance(group_sizes, list)
        and group_sizes
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in group_sizes)
    ):
        found = repr(raw)[:200]
        if isinstance(raw, torch.Tensor):
            shown = raw.tolist() if raw.numel() <= 20 else "..."
            found = f"a {raw.dtype} tensor of shape {list(raw.shape)} ({shown})"
        raise SAEFileError(
            f"{source}: group_sizes is {found}, expected a list of positive whole numbers, the "
            f"latents of each level in order: {_COPY_AGAIN}, or pass matryoshka_widths=[...]."
        )
    widths = torch.tensor(group_sizes).cumsum(0).tolist()
    if widths[-1] != trainer["dict_size"]:
        raise SAEFileError(
            f"{source}: group_sizes {group_sizes} sum to {widths[-1]}, but {config_path} has "
            f"dict_size={trainer['dict_size']}: {_MISMATCH_REMEDY}."
        )
    return widths


#: ``ae.pt`` as dictionary_learning 0.1.0's ``trainSAE`` writes it
_AE_PT = (
    "dictionary_learning's trainSAE saves the SAE there as a PyTorch state dict of tensors "
    "(torch.save(ae.state_dict()))"
)
#: ``config.json`` as ``trainSAE`` writes it, with the fields read here
_DL_CONFIG = (
    "dictionary_learning's trainSAE writes it beside ae.pt, a JSON object "
    '{"trainer": {"dict_class", "activation_dim", "dict_size", "k", ...}, "buffer": {...}}'
)
#: what torch.load's weights-only unpickler says is wrong, after its preamble
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.DOTALL)


def _load_state_dict(path: Path) -> Mapping[str, Any]:
    """``ae.pt`` as ``torch.load(weights_only=True)`` reads it, onto the CPU, or one error.

    Read onto the CPU so that every failure here is about the file itself
    (the SAE is built on ``device`` and the weights copied there). An empty
    file gives ``EOFError``, a truncated one a zip ``RuntimeError`` or an
    ``IndexError``, other bytes an ``UnpicklingError``; a pickle of objects
    other than tensors (a whole module) is refused by the weights-only
    unpickler, whose message this keeps (loading it would run code from the
    file).
    """
    _check_file(path, _AE_PT)
    size = path.stat().st_size
    if size == 0:
        raise SAEFileError(
            f"{path} is empty (0 bytes); {_AE_PT}. The save was interrupted or the "
            f"copy cut short: {_COPY_AGAIN}."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error).strip()
        first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else ""
        unpickler = _UNPICKLER_ERROR.search(text)
        detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
        if unpickler is not None:
            detail += f" {unpickler[1].splitlines()[0]}"
        if unpickler is not None and "Unsupported global" in unpickler[1]:
            found = (
                "pickled objects other than tensors, which are not loaded (unpickling them "
                "could run code from the file)"
            )
            remedy = "save the SAE's state_dict() rather than the object, as trainSAE does"
        else:
            found = f"{size} bytes that are not a readable torch.save checkpoint"
            remedy = f"it is truncated, damaged or another kind of file: {_COPY_AGAIN}"
        raise SAEFileError(
            f"{path} holds {found} ({detail}); {_AE_PT}. {remedy[0].upper()}{remedy[1:]}."
        ) from error
    if not isinstance(loaded, Mapping):
        raise SAEFileError(
            f"{path} holds a {type(loaded).__name__}; {_AE_PT}. Is it the right file?"
        )
    return loaded


def from_dictionary_learning(
    path: str | Path,
    device: str = "cpu",
    *,
    matryoshka_widths: list[int] | None = None,
    dtype: str = "float32",
) -> MatryoshkaSAE:
    """A ``MatryoshkaSAE`` from a dictionary_learning / SAEBench checkpoint, with equal outputs.

    ``path`` is the checkpoint folder (``ae.pt`` and ``config.json``, as
    ``trainSAE`` writes them) or an ``ae.pt`` file, also one under
    ``checkpoints/``. ``config.json`` names the class: ``AutoEncoderTopK`` and
    ``BatchTopKSAE`` save the same tensors but encode differently.

    - ``MatryoshkaBatchTopKSAE``: the levels are the cumulative ``group_sizes``.
    - ``BatchTopKSAE``: one level. Both BatchTopK classes infer with one
      learned threshold (``encode(use_threshold=True)``), which becomes every
      latent's JumpReLU threshold.
    - ``AutoEncoderTopK``: one level, ``topk`` with the checkpoint's ``k``.

    ``matryoshka_widths`` declares levels (replacing a Matryoshka checkpoint's).
    ``device`` stays second, where earlier versions had it, for positional callers.
    """
    path = Path(path)
    weights_path = path / "ae.pt" if path.is_dir() else path
    if not weights_path.exists():
        raise FileNotFoundError(
            f"No dictionary_learning checkpoint at {weights_path}: {_AE_PT}, and its "
            f"config.json beside it.{_subfolders_with(path, 'ae.pt')}"
        )
    folder = weights_path.parent
    # trainSAE writes config.json once per trainer; intermediate saves go to checkpoints/
    config_path = (folder.parent if folder.name == "checkpoints" else folder) / "config.json"
    config = _read_json(config_path, _DL_CONFIG)
    trainer = config.get("trainer")
    where = f"{config_path} ['trainer']"
    if not isinstance(trainer, dict):
        found = "absent" if trainer is None else f"a JSON {_json_type(trainer)}"
        raise SAEFileError(
            f"{where} is {found}, not an object; {_DL_CONFIG}. It is not such a file, or "
            f"was edited: {_COPY_AGAIN}."
        )
    dict_class, d_in, d_sae, k = _fields(
        trainer, ("dict_class", "activation_dim", "dict_size", "k"), where, _DL_CONFIG
    )
    d_in = _whole(d_in, "activation_dim", where)
    d_sae = _whole(d_sae, "dict_size", where)
    k = _whole(k, "k", where)
    activation = (
        _DICTIONARY_LEARNING_ACTIVATIONS.get(dict_class) if isinstance(dict_class, str) else None
    )
    if activation is None:
        raise ValueError(
            f"{config_path}: dict_class {dict_class!r} is not one this reads; supported: "
            f"{', '.join(_DICTIONARY_LEARNING_ACTIVATIONS)}."
        )
    state = dict(_load_state_dict(weights_path))
    is_matryoshka = dict_class == "MatryoshkaBatchTopKSAE"
    if matryoshka_widths is None:
        matryoshka_widths = (
            _group_widths(state, trainer, weights_path, config_path) if is_matryoshka else [d_sae]
        )
    threshold = state.get("threshold")
    if threshold is not None and not isinstance(threshold, torch.Tensor):
        raise SAEFileError(
            f"{weights_path}: threshold is a {type(threshold).__name__}, expected a tensor (the "
            f"learned BatchTopK threshold, a scalar): {_COPY_AGAIN}."
        )
    if activation == "jumprelu" and threshold is not None and threshold.dim() == 0:
        if threshold < 0:
            warnings.warn(
                f"{weights_path}: the BatchTopK threshold was never learned (it is "
                f"{float(threshold)}); every positive activation will fire.",
                stacklevel=2,
            )
        state["threshold"] = threshold.expand(d_sae)
    cfg = _file_config(
        d_in,
        d_sae,
        matryoshka_widths,
        activation,
        k if activation == "topk" else None,
        device,
        dtype,
        {
            "model_name": trainer.get("lm_name"),
            "source_format": f"dictionary_learning {dict_class}",
            "source_config": trainer,
        },
    )
    layout = _SAELENS_LAYOUT if is_matryoshka else _LINEAR_LAYOUT
    description = f"{config_path} ({dict_class}, activation_dim={d_in}, dict_size={d_sae})"
    remedy = (
        f"{_MISMATCH_REMEDY} (ae.pt, or checkpoints/ae_<step>.pt, and the config.json of its "
        "trainer folder)"
    )
    return _import(state, layout, cfg, str(weights_path), description, remedy)


def from_sparsify(
    folder: str | Path,
    matryoshka_widths: list[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> MatryoshkaSAE:
    """A ``MatryoshkaSAE`` from an EleutherAI sparsify ``SparseCoder`` folder, with equal outputs.

    ``folder`` holds ``cfg.json`` and ``sae.safetensors`` as
    ``SparseCoder.save_to_disk`` writes them (one folder per hookpoint). The
    SAE is ``topk`` with the coder's ``k``: sparsify subtracts ``b_dec``,
    keeps each token's ``k`` largest ReLU pre-activations and decodes them
    with ``W_dec [num_latents, d_in]`` plus ``b_dec``. ``normalize_decoder``
    and ``multi_topk`` shape training only (with ``multi_topk``, sparsify's
    training ``forward`` returns the decode of the ``4 k`` largest, the loss it
    adds; ``encode`` keeps ``k``). Transcoders, skip connections and the
    ``groupmax`` activation compute something else and are refused. One level
    unless ``matryoshka_widths`` declares levels.
    """
    folder = Path(folder)
    if folder.is_file():
        parent = f"; give {folder.parent}" if folder.name in ("cfg.json", "sae.safetensors") else ""
        raise SAEFileError(
            f"{folder} is a file: from_sparsify takes the folder that sparsify's "
            f"SparseCoder.save_to_disk writes for one hookpoint (cfg.json and sae.safetensors)"
            f"{parent}."
        )
    cfg_path, weights_path = folder / "cfg.json", folder / "sae.safetensors"
    coder = _read_json(cfg_path, _SPARSIFY_CFG, _subfolders_with(folder, "cfg.json"))
    refused = [why for name, why in _SPARSIFY_UNSUPPORTED.items() if coder.get(name)]
    if coder.get("activation", "topk") != "topk":
        refused.append(
            f"its activation is {coder['activation']!r}: only 'topk' is a MatryoshkaSAE "
            "activation (groupmax keeps the largest latent of each of k contiguous groups)"
        )
    if refused:
        raise ValueError(f"{cfg_path} cannot be read as a MatryoshkaSAE: {'; '.join(refused)}.")
    _check_file(weights_path, _SPARSIFY_WEIGHTS)
    where = str(cfg_path)
    d_in, k, num_latents, expansion_factor = _fields(
        coder, ("d_in", "k", "num_latents", "expansion_factor"), where, _SPARSIFY_CFG
    )
    d_in, k = _whole(d_in, "d_in", where), _whole(k, "k", where)
    num_latents = _whole(num_latents, "num_latents", where, least=0)
    expansion_factor = _whole(expansion_factor, "expansion_factor", where, least=0)
    d_sae = num_latents or d_in * expansion_factor  # as sparsify sizes the coder
    if d_sae == 0:
        raise SAEFileError(
            f"{where}: num_latents and expansion_factor are both 0, so the coder has no "
            "latents; expected num_latents of at least 1 or, with num_latents 0, an "
            f"expansion_factor of at least 1 (latents = d_in * expansion_factor): {_COPY_AGAIN}."
        )
    try:
        read_safetensors_header(weights_path)  # without reading the tensors
    except SAEFileError as error:
        # safe_loading's message says what is wrong; say what belongs there and what to do
        remedy = "" if "copy it again" in str(error) else f": {_COPY_AGAIN}"
        raise SAEFileError(f"{error} ({_SPARSIFY_WEIGHTS}{remedy}.)") from error
    cfg = _file_config(
        d_in,
        d_sae,
        matryoshka_widths if matryoshka_widths is not None else [d_sae],
        "topk",
        k,
        device,
        dtype,
        {"source_format": "sparsify SparseCoder", "source_config": coder},
    )
    try:
        # onto the CPU, so a failure here is about the file; the SAE is built on device
        state = load_file(weights_path, device="cpu")
    except Exception as error:  # what the header check above cannot see
        raise SAEFileError(
            f"{weights_path} cannot be read as safetensors ({type(error).__name__}: {error}): "
            f"{_SPARSIFY_WEIGHTS}. It is damaged: {_COPY_AGAIN}."
        ) from error
    description = f"{cfg_path} (d_in={d_in}, num_latents={d_sae})"
    remedy = f"{_MISMATCH_REMEDY} (cfg.json and sae.safetensors of one hookpoint's folder)"
    return _import(state, _SPARSIFY_LAYOUT, cfg, str(weights_path), description, remedy)
