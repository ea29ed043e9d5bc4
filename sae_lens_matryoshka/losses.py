"""Loss terms and logged metrics shared by every Matryoshka activation."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


def level_mse(levels: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
    """``||x - x_hat_l||^2`` summed over ``d_in`` and averaged over tokens, per level: ``[n_levels]``."""
    return (levels - sae_in).pow(2).sum(dim=-1).flatten(1).mean(dim=1)


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


def dead_latent_loss(
    residual: torch.Tensor,
    hidden_pre: torch.Tensor,
    dead: torch.Tensor,
    W_dec: torch.Tensor,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """Squared error of the top dead latents' reconstruction of ``residual`` (dense).

    The ``d_in // 2`` dead latents with the largest pre-activations decode
    (without bias) towards ``residual``, see :func:`dead_latent_mse`. ``scale``
    rescales activations to unit-norm decoder units.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return residual.new_zeros(())
    candidates = torch.where(dead, hidden_pre, -torch.inf)
    top = candidates.topk(min(aux_k(residual.shape[-1]), n_dead), dim=-1, sorted=False)
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values)
    if scale is not None:
        aux_acts = aux_acts * scale
    return dead_latent_mse(aux_acts @ W_dec, residual, n_dead)


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

    metrics: dict[str, Callable[[], float]] = {}
    for level, width in enumerate(widths):
        metrics[f"level_{width}/mse"] = lambda i=level: mse[i].item()
        metrics[f"level_{width}/explained_variance"] = lambda i=level: (
            1 - mse[i].item() / total_variance()
        )
    return metrics
