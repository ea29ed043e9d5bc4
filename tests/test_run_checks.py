"""Settings a run cannot use and a hook it cannot read: clear errors before any step (issues 25, 30)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.run_checks import check_hook, hook_width

from .conftest import HOOK, tiny_runner_cfg


def test_a_misspelt_hook_names_the_nearest_ones(tiny_model: Any, token_dataset: Any) -> None:
    cfg = tiny_runner_cfg(hook_name="blocks.0.hook_resid_pots")
    with pytest.raises(
        ValueError,
        match=r"hook_name='blocks.0.hook_resid_pots' is not a hook of "
        r"this model. The nearest: blocks.0.hook_resid_post",
    ):
        LanguageModelSAETrainingRunner(
            cfg, override_dataset=token_dataset, override_model=tiny_model
        )


def test_a_d_in_other_than_the_hooks_width_says_which(tiny_model: Any, token_dataset: Any) -> None:
    d_model = tiny_model.cfg.d_model
    sae = MatryoshkaTrainingSAEConfig(d_in=d_model + 1, d_sae=32, k=2, matryoshka_widths=[8, 32])
    with pytest.raises(
        ValueError,
        match=rf"d_in={d_model + 1}, but hook '{HOOK}' gives "
        rf"{d_model} values per token: set d_in={d_model}",
    ):
        LanguageModelSAETrainingRunner(
            tiny_runner_cfg(sae), override_dataset=token_dataset, override_model=tiny_model
        )


def test_attention_heads_count_one_head_or_all(tiny_model: Any) -> None:
    z = "blocks.0.attn.hook_z"
    n_heads, d_head = tiny_model.cfg.n_heads, tiny_model.cfg.d_head
    check_hook(tiny_model, z, n_heads * d_head, None)  # flattened, as SAELens reads it
    check_hook(tiny_model, z, d_head, 1)
    with pytest.raises(ValueError, match=rf"gives {d_head} values per token \(head 1\)"):
        check_hook(tiny_model, z, n_heads * d_head, 1)
    assert hook_width(torch.zeros(2, 3, 5), None) == 5
    assert hook_width(torch.zeros(2, 3, 4, 6), None) == 24
    assert hook_width(torch.zeros(2, 3, 4, 6), 0) == 6


def test_a_sound_run_is_untouched(tiny_model: Any, token_dataset: Any) -> None:
    runner = LanguageModelSAETrainingRunner(
        tiny_runner_cfg(), override_dataset=token_dataset, override_model=tiny_model
    )
    assert runner.sae.cfg.d_in == tiny_model.cfg.d_model


def test_cuda_on_a_torch_without_it_is_refused_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_runner_cfg(device="cuda", model_name="no-such-model")
    with pytest.raises(
        ValueError, match=r"device='cuda', but this torch \(.*\) is a .*use device='cpu'"
    ):
        LanguageModelSAETrainingRunner(cfg)


def test_a_buffer_smaller_than_a_batch_is_refused_before_the_model_loads() -> None:
    """SAELens's own defaults (context 128 x 20 batches = 2,560 < 4,096) trip it at 0%."""
    cfg = tiny_runner_cfg(
        model_name="no-such-model",
        context_size=32,
        n_batches_in_buffer=20,
        train_batch_size_tokens=4096,
    )
    with pytest.raises(
        ValueError,
        match=r"n_batches_in_buffer \* context_size = 20 \* 32 = 640 "
        r"tokens, fewer than one batch \(train_batch_size_tokens=4096\).*at least 128",
    ):
        LanguageModelSAETrainingRunner(cfg)
