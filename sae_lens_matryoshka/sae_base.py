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

    def save_children_flat(self, children: Sequence[str]) -> None:
        """Save and load the tensors of ``children`` under this SAE's own names."""
        module = cast(nn.Module, self)
        module.register_state_dict_post_hook(partial(_lift, children=tuple(children)))
        module.register_load_state_dict_pre_hook(partial(_nest, children=tuple(children)))


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
