"""A misspelt hook or a d_in that is not the hook's width: a clear error before any step (issue 25)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_matryoshka import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.hook_check import check_hook, hook_width

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
