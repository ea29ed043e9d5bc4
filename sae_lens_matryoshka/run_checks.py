"""What a Matryoshka run needs from its settings and its model, checked before it trains.

SAELens's runner meets several common mistakes only after the model has
loaded, some only once training starts: ``device="cuda"`` on a CPU build (an
``AssertionError`` from torch), an activation buffer too small for one batch
(``Buffer size must be greater than or equal to batch size``, at 0%), a
misspelt ``hook_name`` (a bare ``KeyError``) and a ``d_in`` that is not the
hook's width (a tensor-size error that never says ``d_in``). For a
Matryoshka run the plugin wraps ``LanguageModelSAETrainingRunner.__init__``:
:func:`check_settings` runs before anything loads, and :func:`check_hook`
once the model is there (it asks the model for the hook, suggesting the
nearest names, and runs it on one token to measure its width), before any
activation is stored or any step taken; a run from cached activations, which
never runs the model, skips it. Each error names the setting.
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any

import torch
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

from sae_lens_matryoshka.config import is_matryoshka


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


def check_settings(cfg: Any) -> None:
    """Refuse a CUDA device torch cannot use, or a buffer too small for one batch."""
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise ValueError(
            f"device={device!r}, but this torch ({torch.__version__}) is {build}: "
            "use device='cpu' (--device cpu), or install a CUDA build of torch."
        )
    buffer = cfg.n_batches_in_buffer * cfg.context_size
    if buffer < cfg.train_batch_size_tokens:
        least = math.ceil(cfg.train_batch_size_tokens / cfg.context_size)
        raise ValueError(
            f"n_batches_in_buffer * context_size = {cfg.n_batches_in_buffer} * "
            f"{cfg.context_size} = {buffer} tokens, fewer than one batch "
            f"(train_batch_size_tokens={cfg.train_batch_size_tokens}): SAELens's activation "
            f"buffer could never fill it. Set n_batches_in_buffer to at least {least}, or "
            "lower train_batch_size_tokens."
        )


def install() -> None:
    """Check a Matryoshka run's settings before its runner loads, its hook after. Idempotent."""
    runner = LanguageModelSAETrainingRunner
    if getattr(runner, "_matryoshka_run_checks", False):
        return
    init = runner.__init__

    @functools.wraps(init)
    def __init__(
        self: LanguageModelSAETrainingRunner[Any], cfg: Any, *args: Any, **kwargs: Any
    ) -> None:
        checked = is_matryoshka(cfg.sae)
        if checked:
            check_settings(cfg)
        init(self, cfg, *args, **kwargs)
        # a run from cached activations never runs the model (nor should this check)
        if checked and not cfg.use_cached_activations:
            check_hook(self.model, cfg.hook_name, cfg.sae.d_in, cfg.hook_head_index)

    runner.__init__ = __init__
    runner._matryoshka_run_checks = True
