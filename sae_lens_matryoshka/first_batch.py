"""What the first training batch shows before hours are spent on it: warnings, measured once.

Some runs cannot train and still end without an error: activations that are
all zeros (the loss is 0 and nothing changes), one vector repeated (no
variance: the FVU is undefined and a variance-normalised aux loss explodes),
a scale far from what Adam's steps and float32's squares are comfortable with
(entries at 1e-30 square to 0, so the FVU is inf), or an activation that fires
on nothing (a JumpReLU starting threshold above every pre-activation). Only
the data shows these, so the first training step measures its batch (one
host read, on that step only) and warns once, with the measured numbers and
what to do. Under ``torchrun`` each rank measures its own batch and rank 0
shows the warnings.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from sae_lens_matryoshka.activations import TrainingActivation
    from sae_lens_matryoshka.encodings import Encoding

#: the root mean square of the activations' entries that training is comfortable with:
#: Adam moves weights by about the learning rate each step whatever the scale, and
#: SAELens's ``normalize_activations="expected_average_only_in"`` brings entries to about 1
COMFORTABLE_RMS = (1e-3, 1e4)
#: tokens spread around their mean by less than this fraction of their scale are one vector
CONSTANT_SPREAD = 1e-6


class BatchWarning(UserWarning):
    """A training batch whose activations the run cannot learn from as configured."""


class BatchScale(NamedTuple):
    """What one host read tells about a batch and its encoding."""

    #: root mean square of the entries
    rms: float
    #: root mean square distance of the tokens from their mean vector (NaN for one token)
    spread: float
    largest_entry: float
    #: how many latents fired, over all tokens
    n_fired: int
    largest_pre_activation: float


@torch.no_grad()
def measure(x: torch.Tensor, encoding: Encoding) -> BatchScale:
    """The batch's scale and its encoding's firing, in float64 (1e-30 must not square to 0)."""
    rows = x.detach().reshape(-1, x.shape[-1]).double()
    spread = (
        (rows - rows.mean(dim=0)).pow(2).sum(dim=-1).mean().sqrt()
        if rows.shape[0] > 1
        else rows.new_tensor(math.nan)
    )
    numbers = torch.stack(
        [
            rows.pow(2).mean().sqrt(),
            spread,
            rows.abs().max(),
            (encoding.kept_values() > 0).sum().double(),
            encoding.hidden_pre.detach().max().double(),
        ]
    ).tolist()
    rms, spread_value, largest, n_fired, largest_pre = numbers
    return BatchScale(rms, spread_value, largest, int(n_fired), largest_pre)


def problems(scale: BatchScale, activation: TrainingActivation) -> list[str]:
    """What ``scale`` says the run cannot learn from, each with what to do (empty: nothing)."""
    if not math.isfinite(scale.rms):
        return []  # the step refuses non-finite activations itself, naming the count
    if scale.rms == 0:
        return [
            "the first training batch of activations is all zeros: the loss is 0 and nothing "
            "will be learned. Check hook_name (is this hook zero at this layer?) and the dataset."
        ]
    found = []
    low, high = COMFORTABLE_RMS
    if not low <= scale.rms <= high:
        found.append(
            f"the first training batch's activations have entries of root mean square "
            f"{scale.rms:.3g} (largest {scale.largest_entry:.3g}), far outside {low:g} to "
            f"{high:g}: Adam's steps (about the learning rate) and float32's squares are "
            "sized for entries near 1. Set normalize_activations='expected_average_only_in' "
            "(rescales the activations to norm sqrt(d_in) and folds the scale into the saved SAE)."
        )
    if scale.spread <= CONSTANT_SPREAD * scale.rms:
        found.append(
            f"every token of the first training batch has the same activation vector (spread "
            f"{scale.spread:.3g} around their mean, scale {scale.rms:.3g}): there is nothing to "
            "learn beyond b_dec, the FVU is undefined and a variance-normalised aux loss "
            "(aux_loss_form='dictionary_learning') divides by ~0. Check hook_name and the dataset."
        )
    if scale.n_fired == 0:
        hint = activation.why_nothing_fired(scale.largest_pre_activation)
        found.append(
            f"no latent fired on the first training batch (largest pre-activation "
            f"{scale.largest_pre_activation:.3g}){': ' + hint if hint else '.'}"
        )
    return found


def check_first_batch(x: torch.Tensor, encoding: Encoding, activation: TrainingActivation) -> None:
    """Warn (:class:`BatchWarning`) about anything on the first batch the run cannot learn from."""
    for problem in problems(measure(x, encoding), activation):
        warnings.warn(problem, BatchWarning, stacklevel=3)
