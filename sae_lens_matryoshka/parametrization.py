"""How a training SAE's ``b_dec`` starts: SAELens's zeros, or the paper's geometric median.

SAELens starts ``b_dec`` at zero. The paper's code (dictionary_learning)
starts it at the geometric median of the first training batch
(``b_dec_init="geometric_median"``, :class:`GeometricMedianBDec`), so the
encoder first sees centred activations; the training SAE is given the chosen
object once. The paper's other change, decoder rows held at unit norm, is one
of the decoders in ``decoder``.
"""

from __future__ import annotations

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
