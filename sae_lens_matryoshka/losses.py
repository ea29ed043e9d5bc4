"""Loss terms and logged metrics shared by every Matryoshka activation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def level_mse(levels: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
    """``||x - x_hat_l||^2`` summed over ``d_in`` and averaged over tokens, per level: ``[n_levels]``."""
    # one fused kernel, forward and backward, instead of a difference and a power
    squared = F.mse_loss(levels, sae_in.expand_as(levels), reduction="none")
    return squared.sum(dim=-1).flatten(1).mean(dim=1)


def aux_k(d_in: int) -> int:
    """How many dead latents per token the auxiliary loss uses: ``d_in // 2`` (Gao et al. 2024)."""
    return max(d_in // 2, 1)


def dead_latent_mse(recon: torch.Tensor, residual: torch.Tensor, n_dead: int) -> torch.Tensor:
    """The auxiliary loss of a dead-latent reconstruction ``recon`` of ``residual``.

    Scaled by ``min(n_dead / k_aux, 1)`` so that a handful of dead latents do
    not dominate (Gao et al. 2024, Appendix B.1).
    """
    scale = min(n_dead / aux_k(residual.shape[-1]), 1.0)
    return scale * (recon - residual).pow(2).sum(dim=-1).mean()


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
