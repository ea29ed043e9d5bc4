"""What the training and the inference SAE share: the encoder bias, the widths, the saved names.

SAELens's base ``SAE`` has no encoder bias; both Matryoshka SAEs add one and
report their prefix widths. Both keep helper modules (the activation and, in
training, the levels) that own tensors: a JumpReLU's thresholds, BatchTopK's
threshold EMA, the prefix sampler's generator state. ``nn.Module`` would save
those as ``activation_fn.threshold``; SAELens's file format, and every file
written before these modules existed, names them ``threshold``. The hooks
installed here translate in both directions, so ``state_dict``,
``load_state_dict``, checkpoints and saved folders all use the flat names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import nn


class MatryoshkaSAEParts:
    """Mixed into both Matryoshka SAE classes, before SAELens's class."""

    #: set by SAELens's ``SAE``: the config (training or inference), dtype and device
    cfg: Any
    dtype: torch.dtype
    device: torch.device
    hook_z_reshaping_mode: bool
    b_enc: nn.Parameter

    @property
    def matryoshka_widths(self) -> list[int]:
        """The prefix widths, increasing, the last one ``d_sae``."""
        widths: list[int] = self.cfg.matryoshka_widths
        return widths

    def initialize_weights(self) -> None:
        """SAELens's weights, and the encoder bias its base SAE lacks."""
        cast(Any, super()).initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's input processing, once the input is known to be what this SAE reads."""
        check_activations(sae_in, self.cfg.d_in, heads_flattened=self.hook_z_reshaping_mode)
        processed: torch.Tensor = cast(Any, super()).process_sae_in(sae_in)
        return processed

    def decodable(self, feature_acts: torch.Tensor, *widths: int) -> torch.Tensor:
        """``feature_acts`` as decoding multiplies them: dense, in the decoder's dtype.

        Takes what training hands out (the sparse path's COO activations) and
        any floating dtype (cast, as a matmul with the weights needs); warns
        about NaN or infinite values (``warn_non_finite``); refuses
        activations of neither of ``widths`` latents (``d_sae`` if none
        given), and integer or boolean ones (token ids, masks), saying so.
        """
        accepted = widths or (self.cfg.d_sae,)
        if feature_acts.shape[-1] not in accepted:
            expected = " or ".join(str(width) for width in sorted(set(accepted)))
            raise ValueError(
                f"expected activations of {expected} latents in the last dimension, got shape "
                f"{tuple(feature_acts.shape)}: are they from this SAE (d_sae={self.cfg.d_sae})?"
            )
        if not feature_acts.is_floating_point():
            raise TypeError(
                f"latent activations must be floating point, got {feature_acts.dtype} (token "
                "ids or a mask?): decode takes what encode returns."
            )
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        warn_non_finite(feature_acts, "the latent activations to decode")
        return feature_acts.to(cast(Any, self).W_dec.dtype)

    def save_children_flat(self, children: Sequence[str]) -> None:
        """Save and load the tensors of ``children`` under this SAE's own names."""
        module = cast(nn.Module, self)
        module.register_state_dict_post_hook(partial(_lift, children=tuple(children)))
        module.register_load_state_dict_pre_hook(partial(_nest, children=tuple(children)))


def check_activations(x: Any, d_in: int, heads_flattened: bool = False) -> None:
    """Refuse input an SAE cannot read, saying what it expected (before torch fails obscurely)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of activations, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"activations must be floating point, got {x.dtype}: pass the model's "
            "activations at the hook, not token ids."
        )
    if x.dim() == 0:
        raise ValueError(
            f"expected activations with d_in={d_in} in the last dimension, got a scalar "
            f"({x.item()!r}): pass a [..., d_in] tensor."
        )
    width = x.shape[-2:].numel() if heads_flattened and x.dim() >= 2 else x.shape[-1]
    if width != d_in:
        raise ValueError(
            f"expected activations with d_in={d_in} in the last dimension, got shape "
            f"{tuple(x.shape)}: is this SAE for another hook or model?"
        )
    if x.numel() == 0:
        raise ValueError(f"the activation batch is empty (shape {tuple(x.shape)}).")


def warn_non_finite(x: torch.Tensor, what: str) -> None:
    """Warn, with the count, when ``x`` holds NaN or infinite values.

    SAELens encodes and decodes them silently into NaN latents and
    reconstructions far from the input. One host read per call, on inference
    calls only: a training step counts them itself with its one read.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    n_bad = int(finite.numel() - finite.sum())
    warnings.warn(
        f"{what} of shape {tuple(x.shape)} holds {n_bad} NaN or infinite value(s) of "
        f"{finite.numel()}: what comes out for those tokens is not meaningful. Drop or fix them "
        "first (overflowed activations? padding filled with NaN?).",
        stacklevel=3,
    )


def _lift(
    _module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    _metadata: Any,
    *,
    children: tuple[str, ...],
) -> None:
    for child in children:
        nested = f"{prefix}{child}."
        for key in [key for key in state_dict if key.startswith(nested)]:
            state_dict[prefix + key[len(nested) :]] = state_dict.pop(key)


def _nest(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *_args: Any,
    children: tuple[str, ...],
) -> None:
    for child in children:
        for name in getattr(module, child).state_dict():
            if prefix + name in state_dict:
                state_dict[f"{prefix}{child}.{name}"] = state_dict.pop(prefix + name)
