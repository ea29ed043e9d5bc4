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
the source's config gives, or NaN/Inf is refused naming the file. Only
safetensors, JSON and ``torch.load(weights_only=True)`` are read: no loading
path executes code from the files.
"""

from __future__ import annotations

import copy
import json
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
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file

from sae_lens_matryoshka.config import MatryoshkaSAEConfig, validate_widths
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
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

#: sparsify settings whose SparseCoder a MatryoshkaSAE cannot compute, and why
_SPARSIFY_UNSUPPORTED = {
    "transcode": "it is a transcoder (it predicts another module's output from this one's "
    "input, which it does not centre by b_dec)",
    "skip_connection": "it adds a linear skip connection (x @ W_skip.T) to its output",
}


def _import(
    state: Mapping[str, torch.Tensor],
    layout: _Layout,
    cfg: MatryoshkaSAEConfig,
    source: str,
    config: str,
) -> MatryoshkaSAE:
    """A ``MatryoshkaSAE`` of ``cfg`` holding the source's weights, each checked first.

    A tensor that is missing, has another shape than ``cfg`` needs, or holds
    NaN/Inf is refused with a message naming ``source`` (where the weights
    come from) and ``config`` (what sets their shapes), in the source's own
    tensor names: a wrong or damaged file should not surface as a bare
    ``load_state_dict`` error, nor load and compute garbage.
    """
    sae = MatryoshkaSAE(cfg)
    shapes = {name: tensor.shape for name, tensor in sae.state_dict().items()}
    missing = [layout[name][0] for name in shapes if layout[name][0] not in state]
    if missing:
        raise ValueError(f"{source} lacks {missing}, which {config} requires.")
    weights = {}
    for name, shape in shapes.items():
        theirs, transposed = layout[name]
        tensor, expected = state[theirs], shape[::-1] if transposed else shape
        if tensor.shape != expected:
            raise ValueError(
                f"{source}: {theirs} has shape {list(tensor.shape)}, but {config} needs "
                f"{list(expected)}."
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


def _read_json(path: Path, why: str) -> dict[str, Any]:
    """The JSON object at ``path``; ``why`` tells, when it is missing, what writes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {why}.")
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}.")
    return content


def _fields(config: dict[str, Any], names: tuple[str, ...], where: str) -> list[Any]:
    """The values of ``names`` in ``config``, refusing it when any is missing."""
    missing = [name for name in names if config.get(name) is None]
    if missing:
        raise ValueError(f"{where} lacks {missing}.")
    return [config[name] for name in names]


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
    """
    sae, cfg_dict, _ = SAE.from_pretrained_with_cfg_and_sparsity(
        release, sae_id, device=device, dtype=dtype
    )
    if matryoshka_widths is None:
        # SAELens keeps only the fields its config class knows; cfg_dict has them all
        matryoshka_widths = cfg_dict.get("matryoshka_widths")
    return _level_aware(sae, matryoshka_widths, f"SAELens release {release!r}, sae_id {sae_id!r}")


def _group_widths(
    state: dict[str, torch.Tensor], trainer: dict[str, Any], weights_path: Path, config_path: Path
) -> list[int]:
    """A ``MatryoshkaBatchTopKSAE``'s levels: its cumulative ``group_sizes``.

    The class saves them as a buffer; checkpoints of older versions have them
    only in the trainer's config.
    """
    in_weights = "group_sizes" in state
    group_sizes = state["group_sizes"].tolist() if in_weights else trainer.get("group_sizes")
    source = weights_path if in_weights else config_path
    if group_sizes is None:
        raise ValueError(
            f"Neither {weights_path} nor {config_path} gives the group_sizes of the levels."
        )
    widths = torch.tensor(group_sizes).cumsum(0).tolist()
    if widths[-1] != trainer["dict_size"]:
        raise ValueError(
            f"{source}: group_sizes {group_sizes} sum to {widths[-1]}, but {config_path} has "
            f"dict_size={trainer['dict_size']}."
        )
    return widths


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
    if not weights_path.is_file():
        raise FileNotFoundError(f"No dictionary_learning checkpoint at {weights_path}.")
    folder = weights_path.parent
    # trainSAE writes config.json once per trainer; intermediate saves go to checkpoints/
    config_path = (folder.parent if folder.name == "checkpoints" else folder) / "config.json"
    config = _read_json(config_path, "dictionary_learning's trainSAE writes it beside ae.pt")
    trainer = config.get("trainer") or {}
    dict_class, d_in, d_sae, k = _fields(
        trainer, ("dict_class", "activation_dim", "dict_size", "k"), f"{config_path} ['trainer']"
    )
    activation = _DICTIONARY_LEARNING_ACTIVATIONS.get(dict_class)
    if activation is None:
        raise ValueError(
            f"{config_path}: dict_class {dict_class!r} is not one this reads; supported: "
            f"{', '.join(_DICTIONARY_LEARNING_ACTIVATIONS)}."
        )
    state = torch.load(weights_path, map_location=device, weights_only=True)
    is_matryoshka = dict_class == "MatryoshkaBatchTopKSAE"
    if matryoshka_widths is None:
        matryoshka_widths = (
            _group_widths(state, trainer, weights_path, config_path) if is_matryoshka else [d_sae]
        )
    threshold = state.get("threshold")
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
    return _import(state, layout, cfg, str(weights_path), description)


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
    cfg_path, weights_path = folder / "cfg.json", folder / "sae.safetensors"
    written_by = "sparsify's SparseCoder.save_to_disk writes cfg.json and sae.safetensors"
    coder = _read_json(cfg_path, written_by)
    refused = [why for name, why in _SPARSIFY_UNSUPPORTED.items() if coder.get(name)]
    if coder.get("activation", "topk") != "topk":
        refused.append(
            f"its activation is {coder['activation']!r}: only 'topk' is a MatryoshkaSAE "
            "activation (groupmax keeps the largest latent of each of k contiguous groups)"
        )
    if refused:
        raise ValueError(f"{cfg_path} cannot be read as a MatryoshkaSAE: {'; '.join(refused)}.")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: {written_by}.")
    read_safetensors_header(weights_path)  # a truncated or damaged file fails naming it
    d_in, k, num_latents, expansion_factor = _fields(
        coder, ("d_in", "k", "num_latents", "expansion_factor"), str(cfg_path)
    )
    d_sae = num_latents or d_in * expansion_factor  # as sparsify sizes the coder
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
    state = load_file(weights_path, device=device)
    description = f"{cfg_path} (d_in={d_in}, num_latents={d_sae})"
    return _import(state, _SPARSIFY_LAYOUT, cfg, str(weights_path), description)
