"""How a training SAE's parameters start and what keeps them in shape: the paper's recipe, as options.

SAELens starts ``b_dec`` at zero and lets decoder rows take any norm (measuring
activations in unit-norm decoder units when ``rescale_acts_by_decoder_norm``).
The paper's code (dictionary_learning) and sparsify do two things differently,
each available here as an object the training SAE is given once:

- ``b_dec_init="geometric_median"``: ``b_dec`` starts at the geometric median
  of the first training batch (:class:`GeometricMedianBDec`), so the encoder
  first sees centred activations;
- ``normalize_decoder=True``: decoder rows start at unit norm and stay there
  (:class:`UnitNormDecoder`): the gradient's component along each row is
  removed before the optimizer sees it, and the rows are rescaled to unit norm
  before every step and when saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sae_lens_matryoshka.collectives import Collectives

#: Weiszfeld iterations at most, and the step size below which they stop (dictionary_learning's)
_MEDIAN_ITERATIONS = 100
_MEDIAN_TOLERANCE = 1e-5


@torch.no_grad()
def geometric_median(points: torch.Tensor, collectives: Collectives) -> torch.Tensor:
    """The point minimising the summed distance to ``points [n, d]`` (Weiszfeld's iteration).

    Starts at the mean; each step is the mean of the points weighted by the
    inverse of their distance to the current guess, until a step moves less
    than 1e-5 or after 100 steps (as dictionary_learning computes it).
    Under data parallelism ``points`` is this rank's share and the sums run
    over every rank, so each rank gets the median of the whole batch.
    """
    points = points.to(torch.promote_types(points.dtype, torch.float32))
    guess, _ = collectives.mean(points)
    for _ in range(_MEDIAN_ITERATIONS):
        # a point exactly at the guess would get an infinite weight
        weights = 1 / (points - guess).norm(dim=-1).clamp(min=torch.finfo(points.dtype).tiny)
        weighted = collectives.sum(torch.cat([weights @ points, weights.sum()[None]]))
        previous, guess = guess, weighted[:-1] / weighted[-1]
        if float((guess - previous).norm()) < _MEDIAN_TOLERANCE:
            break
    return guess


class ZeroBDec:
    """SAELens's start: ``b_dec`` stays as initialised (zero)."""

    def first_step(self, b_dec: nn.Parameter, x: torch.Tensor, collectives: Collectives) -> None:
        """Called with the first training batch, before it is encoded."""


class GeometricMedianBDec(ZeroBDec):
    """``b_dec`` set to the geometric median of the first training batch (dictionary_learning)."""

    def first_step(self, b_dec: nn.Parameter, x: torch.Tensor, collectives: Collectives) -> None:
        median = geometric_median(x.detach().reshape(-1, x.shape[-1]), collectives)
        with torch.no_grad():
            b_dec.copy_(median)


#: ``b_dec_init`` -> how ``b_dec`` starts
B_DEC_INITS: dict[str, type[ZeroBDec]] = {
    "zeros": ZeroBDec,
    "geometric_median": GeometricMedianBDec,
}


class FreeDecoder:
    """SAELens's decoder: rows of any norm (``rescale_acts_by_decoder_norm`` measures in unit norms)."""

    def initialize(self, W_dec: nn.Parameter, W_enc: nn.Parameter) -> None:
        """Called once the weights are initialised."""

    def before_step(self, W_dec: nn.Parameter) -> None:
        """Called at the start of every training step, before the encoder runs."""

    def for_inference(self, state_dict: dict[str, Any]) -> None:
        """Called on the state dict of the inference SAE being saved."""


class UnitNormDecoder(FreeDecoder):
    """Decoder rows held at unit norm, as dictionary_learning and sparsify train them.

    Rows start at unit norm with ``W_enc = W_dec.T`` (``decoder_init_norm`` does
    not apply). A gradient hook removes each row's gradient component along
    the row, so an optimizer step moves rows (to first order) only along the
    unit sphere, and the rows are rescaled to unit norm before each step (the
    same as after each optimizer update) and in the saved inference SAE.
    """

    def initialize(self, W_dec: nn.Parameter, W_enc: nn.Parameter) -> None:
        with torch.no_grad():
            W_dec.copy_(_unit_rows(W_dec))
            W_enc.copy_(W_dec.T)
        W_dec.register_hook(_tangent_gradient(W_dec))

    def before_step(self, W_dec: nn.Parameter) -> None:
        with torch.no_grad():
            W_dec.copy_(_unit_rows(W_dec))

    def for_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict["W_dec"] = _unit_rows(state_dict["W_dec"])


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    # dictionary_learning's epsilon: a zero row stays zero instead of turning NaN
    return W_dec / (W_dec.norm(dim=-1, keepdim=True) + torch.finfo(W_dec.dtype).eps)


def _tangent_gradient(W_dec: nn.Parameter) -> Any:
    """A hook giving ``W_dec``'s gradient without its component along each row."""

    def project(grad: torch.Tensor) -> torch.Tensor:
        unit = W_dec.detach() / (W_dec.detach().norm(dim=-1, keepdim=True) + 1e-6)
        return grad - (grad * unit).sum(dim=-1, keepdim=True) * unit

    return project


def decoder_norm(normalize_decoder: bool) -> FreeDecoder:
    """The decoder constraint a training config asks for."""
    return UnitNormDecoder() if normalize_decoder else FreeDecoder()
