"""The paper's training configuration in one call, on this package's conventions.

The paper's experiments were trained with dictionary_learning's
``MatryoshkaBatchTopKTrainer``, whose settings do not carry over one to one:

- its reconstruction loss is the *mean* over levels of ``w_l * MSE_l``, with
  ``w_l = 1 / n_levels`` by default; ours is the *sum* ``sum_l w_l * MSE_l``
  with ``w_l = 1``. Its loss is ours with ``level_weights = w_l / n_levels``
  (``1 / n_levels**2`` by default);
- its auxiliary coefficient (1/32) multiplies a dead-latent error divided by
  the residual's variance: ``aux_loss_form="dictionary_learning"``; with
  SAELens's unnormalised form 1/32 would mean something else;
- its levels come from ``group_fractions``, each group ``int(f * dict_size)``
  latents and the last group the remainder;
- it starts ``b_dec`` at the first batch's geometric median, keeps decoder
  rows at unit norm, and infers with an EMA of the BatchTopK cut-off
  (``threshold_beta=0.999``) that starts after step 1000;
- it calls a latent dead after 10M tokens without firing (SAELens counts steps:
  ``dead_feature_window``), warms the learning rate up over 1000 steps,
  optionally decays it linearly to 0 from ``decay_start``, and picks
  ``lr = 2e-4 / sqrt(d_sae / 2**14)`` when none is given.

:func:`paper_recipe` returns the runner fields that set all of this, so that
``LanguageModelSAERunnerConfig(**paper_recipe(...), model_name=..., ...)``
trains the paper's configuration with SAELens's runner; its loss on a batch
equals the trainer's (tested against dictionary_learning itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig

#: dictionary_learning's group fractions for the paper's runs: levels at d_sae * 1/32, 3/32, 7/32, 15/32, 1
PAPER_GROUP_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
#: the trainer's defaults the recipe reproduces
PAPER_AUX_COEFFICIENT = 1 / 32
PAPER_THRESHOLD_BETA = 0.999
PAPER_THRESHOLD_START_STEP = 1000
PAPER_WARMUP_STEPS = 1000
PAPER_DEAD_TOKENS = 10_000_000


def widths_from_group_fractions(d_sae: int, group_fractions: Sequence[float]) -> list[int]:
    """The level widths dictionary_learning makes of ``group_fractions`` (summing to 1).

    Every group but the last has ``int(f * d_sae)`` latents, the last the rest;
    the widths are their running sums.
    """
    if not math.isclose(sum(group_fractions), 1.0):
        raise ValueError(f"group_fractions must sum to 1, got {list(group_fractions)}.")
    sizes = [int(fraction * d_sae) for fraction in group_fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    if min(sizes) <= 0:
        raise ValueError(
            f"group_fractions {list(group_fractions)} give a group without latents at "
            f"d_sae={d_sae} (sizes {sizes})."
        )
    return [sum(sizes[: index + 1]) for index in range(len(sizes))]


def level_weights_from_group_weights(
    group_weights: Sequence[float] | None, n_levels: int
) -> list[float]:
    """Our ``level_weights`` giving dictionary_learning's loss: its weights over ``n_levels``.

    It averages ``w_l * MSE_l`` over levels (``w_l = 1 / n_levels`` if not
    given); we sum ``level_weights[l] * MSE_l``.
    """
    weights = [1 / n_levels] * n_levels if group_weights is None else list(group_weights)
    if len(weights) != n_levels:
        raise ValueError(
            f"group_weights has {len(weights)} entries for {n_levels} groups; give one per group."
        )
    return [weight / n_levels for weight in weights]


def paper_recipe(
    d_in: int,
    d_sae: int,
    k: int,
    train_batch_size_tokens: int,
    training_tokens: int,
    *,
    group_fractions: Sequence[float] = PAPER_GROUP_FRACTIONS,
    group_weights: Sequence[float] | None = None,
    lr: float | None = None,
    decay_start: int | None = None,
    **sae_overrides: Any,
) -> dict[str, Any]:
    """Runner fields for dictionary_learning's ``MatryoshkaBatchTopKTrainer`` defaults.

    Args:
        d_in, d_sae, k: the SAE's input width, latents and active latents per token.
        train_batch_size_tokens, training_tokens: as in the runner config; the
            trainer's step counts (dead latents, warm-up) are converted with them.
        group_fractions, group_weights, lr, decay_start: the trainer's arguments
            of the same names (``decay_start`` in steps; ``None``: no decay).
        sae_overrides: any other ``MatryoshkaTrainingSAEConfig`` field.

    Returns:
        ``sae`` (the ``MatryoshkaTrainingSAEConfig``) and the runner's learning
        rate, schedule, dead-latent window, batch and token counts: pass them
        with the model, hook and dataset to ``LanguageModelSAERunnerConfig``.
    """
    steps = training_tokens // train_batch_size_tokens
    if decay_start is not None and not PAPER_WARMUP_STEPS < decay_start < steps:
        raise ValueError(
            f"decay_start must lie between the {PAPER_WARMUP_STEPS} warm-up steps and the "
            f"{steps} training steps (training_tokens // train_batch_size_tokens), got "
            f"{decay_start}."
        )
    widths = widths_from_group_fractions(d_sae, group_fractions)
    sae = MatryoshkaTrainingSAEConfig(
        **{
            "d_in": d_in,
            "d_sae": d_sae,
            "k": k,
            "activation": "batchtopk",
            "matryoshka_widths": widths,
            "level_weights": level_weights_from_group_weights(group_weights, len(widths)),
            "aux_loss_coefficient": PAPER_AUX_COEFFICIENT,
            "aux_loss_form": "dictionary_learning",
            "normalize_decoder": True,
            "rescale_acts_by_decoder_norm": False,
            "b_dec_init": "geometric_median",
            "topk_threshold_lr": 1 - PAPER_THRESHOLD_BETA,
            # it updates the EMA at steps above its start step
            "topk_threshold_start_step": PAPER_THRESHOLD_START_STEP + 1,
            "inference_threshold": "ema",
            **sae_overrides,
        }
    )
    return {
        "sae": sae,
        "train_batch_size_tokens": train_batch_size_tokens,
        "training_tokens": training_tokens,
        # the scaling law of the paper's Figure 3, as the trainer applies it
        "lr": lr if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14),
        "lr_scheduler_name": "constant",
        "lr_warm_up_steps": PAPER_WARMUP_STEPS,
        "lr_decay_steps": 0 if decay_start is None else steps - decay_start,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        # dead after 10M tokens without firing; SAELens: after more than this many steps
        "dead_feature_window": math.ceil(PAPER_DEAD_TOKENS / train_batch_size_tokens) - 1,
    }
