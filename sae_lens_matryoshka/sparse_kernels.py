"""The sparse training path: exact top-k selection, sparse encoder backward, sparse decode.

With ``batchtopk`` and ``topk`` at most ``k`` of ``d_sae`` latents are active
per token. Only the encoder's forward matmul must be dense (every
pre-activation competes in the selection); everything after it is computed from
the active ``(token, latent, value)`` triples:

- selection (:func:`batch_topk_indices`, :func:`topk_indices`) returns the same
  entries as a dense top-k, but filters with a threshold estimated from a
  sample before ranking, so the full ``n_tokens x d_sae`` top-k is never run;
- :class:`SparseEncoderValues` gives the selected pre-activations an encoder
  backward that touches only the active latents' columns of ``W_enc``;
- :func:`decode_levels_sparse` decodes every Matryoshka level in one
  ``embedding_bag`` over (level group, token) bags followed by a cumulative sum,
  so no dense ``n_tokens x d_sae`` activation matrix enters the decoder.

The dense path (``training_path="dense"``) computes the same loss and gradients
with dense matmuls; the tests hold the two equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: sample size for estimating the selection threshold; the result is exact
#: whatever the sample, a better estimate only means fewer candidates to rank
_THRESHOLD_SAMPLE = 1 << 16
#: the threshold aims for this many times the entries to keep, so that it
#: almost never falls above the true cut-off (the exact fallback then runs)
_CANDIDATE_MARGIN = 2.0
_SAMPLER_SEED = 0x5EED


def _sample_positions(numel: int, device: torch.device) -> torch.Tensor:
    # a private generator: selection must not consume the user's global RNG
    generator = torch.Generator(device=device).manual_seed(_SAMPLER_SEED)
    return torch.randint(0, numel, (_THRESHOLD_SAMPLE,), generator=generator, device=device)


def _candidate_threshold(flat: torch.Tensor, n_keep: int) -> float:
    """A value that, with high probability, at least ``n_keep`` entries of ``flat`` exceed."""
    if flat.numel() <= 4 * _THRESHOLD_SAMPLE:
        return 0.0
    sample = flat[_sample_positions(flat.numel(), flat.device)]
    above = math.ceil(_CANDIDATE_MARGIN * n_keep / flat.numel() * sample.numel()) + 16
    if above >= sample.numel():
        return 0.0
    return max(float(sample.kthvalue(sample.numel() - above).values), 0.0)


def batch_topk_indices(hidden_pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(token, latent)`` entries BatchTopK keeps: the ``k * n_tokens`` largest positive ones.

    Equal to the nonzero entries of a dense ``batch_topk`` (ties at the cut-off
    aside, which a dense top-k also breaks arbitrarily). Instead of ranking all
    ``n_tokens * d_sae`` values, entries above a threshold estimated from a
    sample are ranked; when fewer than ``k * n_tokens`` pass it, every positive
    entry is ranked instead, so the result never depends on the estimate.
    """
    hidden_pre = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    n_tokens, d_sae = hidden_pre.shape
    flat = hidden_pre.reshape(-1)
    n_keep = min(int(k * n_tokens), flat.numel())
    candidates = (flat > _candidate_threshold(flat, n_keep)).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        candidates = (flat > 0).nonzero().squeeze(1)
    if candidates.numel() > n_keep:
        ranked = flat[candidates].topk(n_keep, sorted=False).indices
        candidates = candidates[ranked]
    return candidates // d_sae, candidates % d_sae


def topk_indices(hidden_pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(token, latent)`` entries TopK keeps with a positive value (ReLU drops the rest)."""
    hidden_pre = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    top = hidden_pre.topk(k, dim=-1, sorted=False)
    token = torch.arange(hidden_pre.shape[0], device=hidden_pre.device).repeat_interleave(k)
    latent = top.indices.reshape(-1)
    positive = top.values.reshape(-1) > 0
    return token[positive], latent[positive]


def dead_topk_indices(
    hidden_pre: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the ``k_aux`` dead latents with the largest pre-activations (any sign).

    The selection of the dead-latent auxiliary loss. ``dead`` is a boolean mask
    over ``hidden_pre``'s last dimension; latent ids are returned in its indexing.
    """
    hidden_pre = hidden_pre.reshape(-1, hidden_pre.shape[-1])
    dead_latents = dead.nonzero().squeeze(1)
    n_pick = min(k_aux, dead_latents.numel())
    top = hidden_pre[:, dead_latents].topk(n_pick, dim=-1, sorted=False)
    token = torch.arange(hidden_pre.shape[0], device=hidden_pre.device).repeat_interleave(n_pick)
    return token, dead_latents[top.indices.reshape(-1)]


def _bags(keys: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that groups equal ``keys`` together, and each bag's offset in that order."""
    order = keys.argsort()
    counts = torch.bincount(keys, minlength=n_bags)
    return order, counts.cumsum(0) - counts


def bag_sum(
    weight: torch.Tensor, rows: torch.Tensor, bags: torch.Tensor, scales: torch.Tensor, n_bags: int
) -> torch.Tensor:
    """``out[b] = sum over i with bags[i] == b of scales[i] * weight[rows[i]]``, shape ``[n_bags, d]``.

    One ``embedding_bag``: no ``[len(rows), d]`` intermediate is materialised,
    and its autograd gives ``weight`` and ``scales`` their gradients.
    """
    order, offsets = _bags(bags, n_bags)
    return F.embedding_bag(
        rows[order],
        weight,
        offsets,
        mode="sum",
        per_sample_weights=scales[order].to(weight.dtype),
    )


class SparseEncoderValues(torch.autograd.Function):
    """Selected pre-activations ``(sae_in[t] @ W_enc[:, j] + b_enc[j]) * scale[j]``, sparse backward.

    ``scale`` (optional) is ``||W_dec_j||`` when activations are measured in
    unit-norm decoder units. Forward reads the values from the dense
    pre-activations already computed (without gradient) for the selection, so
    they are bit-identical to the dense path's. Backward touches only the
    selected latents: ``W_enc``'s gradient column ``j`` sums
    ``grad * scale[j] * sae_in[t]`` over the tokens where ``j`` is active,
    ``b_enc``'s sums ``grad * scale[j]``, ``scale``'s sums ``grad * value / scale[j]``,
    and ``sae_in``'s (which reaches ``b_dec`` when it is subtracted from the
    input) sums ``grad * scale[j] * W_enc[:, j]`` over each token's active latents.
    """

    @staticmethod
    def forward(
        ctx: Any,
        sae_in: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,  # noqa: ARG004 (an input so that it receives a gradient)
        scale: torch.Tensor | None,
        hidden_pre: torch.Tensor,
        token: torch.Tensor,
        latent: torch.Tensor,
    ) -> torch.Tensor:
        values = hidden_pre[token, latent]
        ctx.save_for_backward(sae_in, W_enc, scale, values, token, latent)
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, scale, values, token, latent = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad = grad.to(W_enc.dtype)
        grad_scale = None
        grad_raw = grad
        if scale is not None:
            unit = scale[latent].to(W_enc.dtype)
            grad_raw = grad * unit
            if ctx.needs_input_grad[3]:
                grad_scale = torch.zeros_like(scale).index_add_(
                    0, latent, (grad * values.to(W_enc.dtype) / unit).to(scale.dtype)
                )
        grad_sae_in = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_sae_in = bag_sum(W_enc.t().contiguous(), latent, token, grad_raw, sae_in.shape[0])
            grad_sae_in = grad_sae_in.to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            # built as [d_sae, d_in] (one bag per latent), returned transposed
            grad_W_enc = bag_sum(sae_in.to(W_enc.dtype), token, latent, grad_raw, d_sae).t()
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=grad.device)
            grad_b_enc.index_add_(0, latent, grad_raw)
        return grad_sae_in, grad_W_enc, grad_b_enc, grad_scale, None, None, None


def encoder_values(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    scale: torch.Tensor | None,
    hidden_pre: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
) -> torch.Tensor:
    """The pre-activations at ``(token, latent)``, differentiable sparsely (see :class:`SparseEncoderValues`)."""
    values = SparseEncoderValues.apply(sae_in, W_enc, b_enc, scale, hidden_pre, token, latent)
    return values  # type: ignore[no-any-return]


def decode_levels_sparse(
    values: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    widths: Sequence[int],
    n_tokens: int,
    detach_between_levels: bool = False,
) -> torch.Tensor:
    """Every level's reconstruction from active triples, shape ``[n_levels, n_tokens, d_in]``.

    Equal to :func:`~sae_lens_matryoshka.levels.decode_levels` on the dense
    activations: each (group, token) bag sums its active decoder rows, and the
    levels are the running sum over groups, plus ``b_dec``.
    """
    bounds = torch.tensor(list(widths[:-1]), device=latent.device)
    group = torch.bucketize(latent, bounds, right=True)
    n_levels = len(widths)
    partials = bag_sum(W_dec, latent, group * n_tokens + token, values, n_levels * n_tokens)
    partials = partials.view(n_levels, n_tokens, -1)
    levels = partials.cumsum(dim=0) + b_dec
    if detach_between_levels:
        levels = torch.cat([levels[:1], levels[:-1].detach() + partials[1:]])
    return levels


def dense_acts(
    values: torch.Tensor, token: torch.Tensor, latent: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """The dense ``[n_tokens, d_sae]`` activations (no gradient), for SAELens's logging and dead-latent stats."""
    acts = values.new_zeros(shape)
    acts[token, latent] = values.detach()
    return acts
