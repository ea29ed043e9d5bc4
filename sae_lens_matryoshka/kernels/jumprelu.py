"""The JumpReLU, and the straight-through estimators that train its thresholds."""

from __future__ import annotations

from typing import Any

import torch


def jumprelu(hidden_pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReLU that also zeroes every latent at or below its threshold (no gradient to it)."""
    return hidden_pre.relu() * (hidden_pre > threshold).to(hidden_pre.dtype)


def _remember(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> None:
    ctx.save_for_backward(x, threshold)
    ctx.bandwidth = bandwidth


def _kernel(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``, ``threshold`` and ``rect((x - threshold) / bandwidth) * grad / bandwidth``.

    The rectangle kernel estimates the derivative of the jump at the
    threshold (Rajamanoharan et al. 2024); both estimators below scale it.
    """
    x, threshold = ctx.saved_tensors
    scaled = (x - threshold) / ctx.bandwidth
    rectangle = ((scaled > -0.5) & (scaled < 0.5)).to(x.dtype)
    return x, threshold, rectangle * grad / ctx.bandwidth


def _sum_to_latents(grad: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)


class JumpReLUSTE(torch.autograd.Function):
    """JumpReLU whose threshold learns through a straight-through estimator.

    Forward: ``x * (x > threshold)``. Backward: the input gets the gradient
    where the latent fired; the threshold gets
    ``-(threshold / bandwidth) * rect((x - threshold) / bandwidth) * grad``,
    a kernel estimate of the jump's effect.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        _remember(ctx, x, threshold, bandwidth)
        return x * (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, threshold, kernel = _kernel(ctx, grad)
        threshold_grad = _sum_to_latents(-threshold * kernel).to(threshold.dtype)
        return (x > threshold).to(grad.dtype) * grad, threshold_grad, None


class StepSTE(torch.autograd.Function):
    """Heaviside step ``x > threshold`` (the L0 of a JumpReLU) with a threshold STE.

    Backward: the threshold gets ``-(1 / bandwidth) * rect((x - threshold) / bandwidth) * grad``;
    the input gets none, as in DeepMind's JumpReLU training.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> torch.Tensor:
        _remember(ctx, x, threshold, bandwidth)
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        _, threshold, kernel = _kernel(ctx, grad)
        return None, _sum_to_latents(-kernel).to(threshold.dtype), None
