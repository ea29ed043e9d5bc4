"""Loss terms and logged metrics shared by every Matryoshka activation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sae_lens_matryoshka.collectives import Collectives


def level_mse(reconstructions: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
    """``||x - x_hat_l||^2`` summed over ``d_in`` and averaged over tokens, per level: ``[n_levels]``."""
    # one fused kernel, forward and backward, instead of a difference and a power
    squared = F.mse_loss(reconstructions, sae_in.expand_as(reconstructions), reduction="none")
    return squared.sum(dim=-1).flatten(1).mean(dim=1)


def aux_k(d_in: int) -> int:
    """How many dead latents per token the auxiliary loss uses: ``d_in // 2`` (Gao et al. 2024)."""
    return max(d_in // 2, 1)


class ScaledAuxLoss:
    """SAELens's dead-latent loss (Gao et al. 2024): the dead latents decode with their sign.

    The squared error of their reconstruction of the residual, scaled by
    ``min(n_dead / k_aux, 1)`` so that a handful of dead latents do not
    dominate (Appendix B.1).
    """

    #: whether dead latents' pre-activations pass a ReLU before they decode
    rectified = False

    def __call__(
        self, recon: torch.Tensor, residual: torch.Tensor, n_dead: int, collectives: Collectives
    ) -> torch.Tensor:
        """The loss of ``recon`` for ``residual`` (this process's tokens), ``n_dead`` latents dead."""
        del collectives  # a mean over tokens: the replicas' gradients average to the batch's
        scale = min(n_dead / aux_k(residual.shape[-1]), 1.0)
        return scale * (recon - residual).pow(2).sum(dim=-1).mean()


class VarianceNormalizedAuxLoss(ScaledAuxLoss):
    """dictionary_learning's dead-latent loss: ReLU'd dead latents, error over the residual's variance.

    ``||r - recon||^2 / ||r - mean(r)||^2`` (each summed over ``d_in`` and
    averaged over tokens), computed in float32 as there; its coefficient is
    then relative to a unit-free term (the paper's code uses 1/32). When the
    residual does not vary at all it is 0 (dictionary_learning's would be
    the largest float, a spike no optimizer step should take). Under data
    parallelism the variance is the whole batch's, so that the replicas'
    averaged gradients are one process's.
    """

    rectified = True

    def __call__(
        self, recon: torch.Tensor, residual: torch.Tensor, n_dead: int, collectives: Collectives
    ) -> torch.Tensor:
        del n_dead  # not scaled by how many are dead
        residual = residual.float().reshape(-1, residual.shape[-1])
        error = (residual - recon.float().reshape_as(residual)).pow(2).sum(dim=-1).mean()
        mean, n_tokens = collectives.mean(residual)
        variance = collectives.sum((residual - mean).pow(2).sum()) / n_tokens
        return (error / variance).nan_to_num(0.0, posinf=0.0)


#: ``aux_loss_form`` -> the dead-latent loss
AUX_LOSSES: dict[str, ScaledAuxLoss] = {
    "saelens": ScaledAuxLoss(),
    "dictionary_learning": VarianceNormalizedAuxLoss(),
}


def level_metrics(
    sae_in: torch.Tensor, mse: torch.Tensor, widths: Sequence[int]
) -> dict[str, Callable[[], float]]:
    """Per-level MSE and explained variance, computed only when SAELens logs them.

    Explained variance is SAELens's batch definition,
    ``1 - mean ||x - x_hat||^2 / mean ||x - mean(x)||^2``, per level.
    """

    @functools.cache
    def total_variance() -> float:
        x = sae_in.detach().float().reshape(-1, sae_in.shape[-1])
        return (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean().item()

    def level_mse_value(level: int) -> float:
        return mse[level].item()

    def explained_variance(level: int) -> float:
        return 1 - mse[level].item() / total_variance()

    metrics: dict[str, Callable[[], float]] = {}
    for level, width in enumerate(widths):
        metrics[f"level_{width}/mse"] = functools.partial(level_mse_value, level)
        metrics[f"level_{width}/explained_variance"] = functools.partial(explained_variance, level)
    return metrics
