"""What SAELens's trainer keeps of a Matryoshka training step: nothing it will not read.

SAELens's ``fit`` holds each step's ``TrainStepOutput`` until the next step
has returned, so every tensor in it is alive through the whole next step.
Two of them are ``n_tokens x d_sae``: the pre-activations (1 GiB in float32
at Gemma-2-2B size, 4096 tokens x 65,536 latents), which the trainer never
reads, and on the dense path (``jumprelu``, ``relu``) the activations, which
it reads after the step only on a wandb logging step. ``install`` (called
when the plugin registers) wraps ``SAETrainer._train_step`` so that, for a
Matryoshka SAE, the output it hands back holds neither beyond that: they are
replaced by empty ``[0, d_sae]`` tensors once the step (forward, backward,
optimizer step) is done. ``training_forward_pass`` called directly returns
everything, as SAELens's own SAEs do.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka.config import trains_matryoshka


def release_unread(output: TrainStepOutput, keep_feature_acts: bool) -> None:
    """Drop ``output``'s pre-activations, and its dense activations unless ``keep_feature_acts``.

    Sparse (COO) activations hold only the kept entries and stay.
    """
    output.hidden_pre = _emptied(output.hidden_pre)
    if not keep_feature_acts and not output.feature_acts.is_sparse:
        output.feature_acts = _emptied(output.feature_acts)


def _emptied(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.new_empty((0, tensor.shape[-1]))


def install() -> None:
    """Make SAELens's trainer keep no unread ``n_tokens x d_sae`` tensor of a step. Idempotent."""
    if getattr(SAETrainer, "_matryoshka_kept_outputs", False):
        return
    train_step = SAETrainer._train_step

    @functools.wraps(train_step)
    def _train_step(self: SAETrainer[Any, Any], *args: Any, **kwargs: Any) -> TrainStepOutput:
        output = train_step(self, *args, **kwargs)
        if trains_matryoshka(self):
            # the step's logging, which reads the activations, comes after it
            release_unread(output, keep_feature_acts=self._is_logging_step())
        return output

    SAETrainer._train_step = _train_step
    SAETrainer._matryoshka_kept_outputs = True
