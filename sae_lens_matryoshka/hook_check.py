"""The model hook a Matryoshka run reads, checked as soon as the model is there.

SAELens's runner loads the model and only meets its hook when the activation
store first runs it: a misspelt ``hook_name`` ends in a bare ``KeyError``, and
a ``d_in`` that is not the hook's width in a tensor-size error that never
says ``d_in``. For a Matryoshka run the plugin wraps
``LanguageModelSAETrainingRunner.__init__`` so that, once the model is
loaded, :func:`check_hook` asks the model for the hook (suggesting the
nearest names) and runs it on one token to measure its width, before any
activation is stored or any step taken.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

from sae_lens_matryoshka.config import ARCHITECTURE


def hook_width(activation: torch.Tensor, head_index: int | None) -> int:
    """What an SAE reads per token from one hook's ``activation`` ``[batch, pos, ...]``.

    Attention hooks with a head axis ``[batch, pos, heads, d_head]`` give one
    head's ``d_head`` with ``hook_head_index``, else the heads flattened.
    """
    if activation.ndim == 4:
        return activation.shape[-1] if head_index is not None else activation.shape[-2:].numel()
    return activation.shape[-1]


def check_hook(model: Any, hook_name: str, d_in: int, head_index: int | None) -> None:
    """Refuse a ``hook_name`` the model lacks, or a ``d_in`` other than the hook's width."""
    hooks = list(getattr(model, "hook_dict", {}))
    if hooks and hook_name not in hooks:
        close = difflib.get_close_matches(hook_name, hooks, n=5, cutoff=0.6)
        nearest = f" The nearest: {', '.join(close)}." if close else ""
        raise ValueError(
            f"hook_name={hook_name!r} is not a hook of this model.{nearest} It has "
            f"{len(hooks)} hooks, from {hooks[0]!r} to {hooks[-1]!r} (all: "
            "list(model.hook_dict))."
        )
    if not hooks or not hasattr(model, "run_with_cache"):
        return  # another kind of model: the activation store will tell
    one_token = torch.zeros((1, 1), dtype=torch.long, device=getattr(model.cfg, "device", "cpu"))
    with torch.no_grad():
        _, cache = model.run_with_cache(one_token, names_filter=[hook_name])
    width = hook_width(cache[hook_name], head_index)
    if width != d_in:
        raise ValueError(
            f"d_in={d_in}, but hook {hook_name!r} gives {width} values per token"
            + (f" (head {head_index})" if head_index is not None else "")
            + f": set d_in={width}."
        )


def install() -> None:
    """Check a Matryoshka run's hook once its runner has the model. Idempotent."""
    runner = LanguageModelSAETrainingRunner
    if getattr(runner, "_matryoshka_hook_check", False):
        return
    init = runner.__init__

    @functools.wraps(init)
    def __init__(
        self: LanguageModelSAETrainingRunner[Any], cfg: Any, *args: Any, **kwargs: Any
    ) -> None:
        init(self, cfg, *args, **kwargs)
        architecture = getattr(getattr(cfg, "sae", None), "architecture", None)
        if architecture is not None and architecture() == ARCHITECTURE:
            check_hook(self.model, cfg.hook_name, cfg.sae.d_in, cfg.hook_head_index)

    runner.__init__ = __init__
    runner._matryoshka_hook_check = True
