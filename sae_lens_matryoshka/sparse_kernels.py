"""The sparse training path's kernels: exact selection, sparse encoder backward, bag decode.

With ``batchtopk`` and ``topk`` at most ``k`` of ``d_sae`` latents are active
per token. Only the encoder's forward matmul must be dense (every
pre-activation competes in the selection); everything after it is computed
from the active ``(token, latent)`` entries. Every function here keeps the
entries **token-major**, as the selections produce them: tokens
non-decreasing and, within a token, latents increasing. That order is what
makes the rest cheap: a token's entries are contiguous (a CSR row) and a
token's entries of one Matryoshka group follow each other, so the bags need
no sort and the sparse product takes the entries as they are.

- selection (:func:`batch_topk_entries`, :func:`topk_entries`) returns the
  entries a dense top-k would keep, filtering with a threshold estimated from
  a sample so that the full ``n_tokens x d_sae`` ranking never runs;
- :class:`SparseEncoderValues` gives selected pre-activations an encoder
  backward that touches only the selected latents: the ``W_enc`` gradient is
  one sparse-dense product with the token-major (CSR) gradient matrix;
- :func:`decode_groups` decodes every Matryoshka group of every token in one
  ``embedding_bag`` over (token, group) bags.

The dense path (``training_path="dense"``) computes the same loss and gradients
with dense matmuls; the tests hold the two equal.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: the largest and smallest samples for estimating the selection threshold (at
#: most 1/16 of the values); the result is exact whatever the sample, a better
#: estimate only means fewer candidates to rank
_THRESHOLD_SAMPLE = 1 << 16
_SMALLEST_SAMPLE = 1 << 10
#: the threshold aims for this many times the entries to keep, so that it
#: almost never falls above the true cut-off (the exact fallback then runs)
_CANDIDATE_MARGIN = 2.0
_SAMPLER_SEED = 0x5EED

# torch warns once per process that its CSR support is in beta; the CSR products
# used here are tested, so that one warning is spent here, silently
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), (0, 0)
    )


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """Fixed random positions to sample (a private generator leaves the global RNG alone)."""
    generator = torch.Generator(device=device).manual_seed(_SAMPLER_SEED)
    return torch.randint(0, numel, (size,), generator=generator, device=device)


def _candidate_threshold(flat: torch.Tensor, n_keep: int) -> torch.Tensor | float:
    """A value that, with high probability, at least ``n_keep`` entries of ``flat`` exceed.

    Stays on the device (no host synchronisation); 0 where sampling cannot help.
    """
    size = min(_THRESHOLD_SAMPLE, flat.numel() // 16)
    if size < _SMALLEST_SAMPLE:
        return 0.0
    sample = flat[_sample_positions(flat.numel(), size, flat.device)]
    above = math.ceil(_CANDIDATE_MARGIN * n_keep / flat.numel() * size) + 16
    if above >= sample.numel():
        return 0.0
    return sample.kthvalue(sample.numel() - above).values.clamp(min=0.0)


def batch_topk_entries(hidden_pre: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_keep`` largest positive entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    The same entries as a dense ``topk`` over the flattened matrix (ties at
    the cut-off are broken by position, where a dense top-k breaks them
    arbitrarily); fewer when fewer are positive. Instead of ranking all
    ``n_tokens * d_sae`` values, entries above a threshold estimated from a
    sample are ranked; when fewer than ``n_keep`` pass it, every positive entry
    is ranked instead, so the result never depends on the estimate.
    """
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    if n_keep <= 0:
        nothing = torch.zeros(0, dtype=torch.long, device=flat.device)
        return nothing, nothing
    # The host synchronisation BatchTopK needs: how many entries pass the
    # threshold decides the shapes of everything that follows.
    candidates = (flat > _candidate_threshold(flat, n_keep)).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        candidates = (flat > 0).nonzero().squeeze(1)
    if candidates.numel() > n_keep:
        values = flat[candidates]
        cutoff = values.kthvalue(values.numel() - n_keep + 1).values
        # at least n_keep candidates reach the cut-off; the first n_keep of them
        # (ties broken by position) have a static size, so no synchronisation
        kept = torch.nonzero_static(values >= cutoff, size=n_keep).squeeze(1)
        candidates = candidates[kept]
    return candidates // d_sae, candidates % d_sae


def topk_entries(hidden_pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    Exactly ``k`` per token, whatever their sign, so the shapes are static (no
    host synchronisation); TopK's ReLU zeroes the non-positive ones afterwards.
    """
    latent = hidden_pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    token = torch.arange(hidden_pre.shape[0], device=hidden_pre.device).repeat_interleave(k)
    return token, latent.reshape(-1)


def _row_starts(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Where each row starts in the non-decreasing ``rows``: ``[n_rows + 1]``, the last is ``len(rows)``."""
    return torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))


def encoder_weight_grad(
    sae_in: torch.Tensor, token: torch.Tensor, latent: torch.Tensor, grad: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """``sae_in.T @ G`` with ``G [n_tokens, d_sae]`` holding ``grad`` at the (token-major) entries.

    The gradient of ``W_enc [d_in, d_sae]``, in its own layout, as one
    sparse-dense product: the token-major entries are ``G``'s CSR form as they
    are, so nothing is materialised per entry and this code sorts nothing. (On
    CPU, PyTorch computes the product through ``G``'s transpose and converts it
    to latent-major order inside, a sort of the entries: about a tenth of the
    product's time at the README's default size.) Computed in at least
    float32 (sparse products have no bfloat16 kernel on CPU).
    """
    dtype = torch.promote_types(sae_in.dtype, torch.float32)
    matrix = torch.sparse_csr_tensor(
        _row_starts(token, sae_in.shape[0]),
        latent,
        grad.to(dtype),
        (sae_in.shape[0], d_sae),
        check_invariants=False,
    )
    # written in place over an uninitialised output (beta=0 ignores it, NaN
    # included): a plain mm zero-fills its result and copies the product over
    # it. A backward under autocast would cast the product back to bfloat16.
    out = sae_in.new_empty(sae_in.shape[1], d_sae, dtype=dtype)
    with torch.autocast(sae_in.device.type, enabled=False):
        return out.addmm_(sae_in.t().to(dtype), matrix, beta=0)


class SparseEncoderValues(torch.autograd.Function):
    """Selected pre-activations ``sae_in[t] @ W_enc[:, j] + b_enc[j]``, given, with a sparse backward.

    ``values`` are computed without a graph (read from the dense
    pre-activations the selection ranked, so they are bit-identical to the
    dense path's); this gives them the gradient of that formula, where
    ``sae_in = x - shift`` is the processed input (``shift`` is ``b_dec`` when
    it is subtracted from the input, else None). Backward touches only the
    selected latents: ``W_enc``'s gradient is :func:`encoder_weight_grad`,
    ``b_enc``'s sums the gradient per latent, and ``shift``'s is
    ``-W_enc @ (b_enc's gradient)``: the input is data, so its per-token
    gradient is never needed, only its sum, which reaches ``b_dec``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        sae_in: torch.Tensor,
        shift: torch.Tensor | None,  # noqa: ARG004 (an input so that it receives a gradient)
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,  # noqa: ARG004 (an input so that it receives a gradient)
        token: torch.Tensor,
        latent: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, token, latent)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        sae_in, W_enc, token, latent = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad = grad.to(W_enc.dtype)
        grad_shift = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=grad.device)
            grad_b_enc.index_add_(0, latent, grad)
        if ctx.needs_input_grad[2]:
            grad_shift = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[3]:
            grad_W_enc = encoder_weight_grad(sae_in, token, latent, grad, d_sae).to(W_enc.dtype)
        return None, None, grad_shift, grad_W_enc, grad_b_enc, None, None


def decode_groups(
    weights: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    W_dec: torch.Tensor,
    n_tokens: int,
    bounds: torch.Tensor,
) -> torch.Tensor:
    """Each token's decode of each Matryoshka group, ``[n_tokens, n_groups, d_in]``.

    Group ``g`` holds the latents between ``bounds[g - 1]`` and ``bounds[g]``
    (the inner level widths). Entry ``(t, g)`` sums ``weights[i] * W_dec[latent[i]]``
    over the token's entries in the group: one ``embedding_bag``, whose bags
    ``t * n_groups + g`` the token-major entries already list in order.
    """
    n_groups = bounds.numel() + 1
    bag = token * n_groups + torch.bucketize(latent, bounds, right=True)
    offsets = _row_starts(bag, n_tokens * n_groups)[:-1]
    out = F.embedding_bag(
        latent, W_dec, offsets, mode="sum", per_sample_weights=weights.to(W_dec.dtype)
    )
    return out.view(n_tokens, n_groups, -1)


def _running_sums(
    terms: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], start: torch.Tensor | None
) -> torch.Tensor:
    """``outputs[i] = start + terms[0] + ... + terms[i]``, row-wise adds; returns the last sum.

    Summed in at least float32, each output rounded once: in the outputs
    themselves when they are that wide, else in a float32 running sum.
    """
    wide = torch.promote_types(terms[0].dtype, torch.float32)
    if outputs[0].dtype == wide:
        if start is None:
            outputs[0].copy_(terms[0])
        else:
            torch.add(terms[0], start, out=outputs[0])
        for i in range(1, len(terms)):
            torch.add(outputs[i - 1], terms[i], out=outputs[i])
        return outputs[-1]
    running = terms[0].to(wide, copy=True)
    if start is not None:
        running += start
    outputs[0].copy_(running)
    for term, output in zip(terms[1:], outputs[1:], strict=True):
        running += term
        output.copy_(running)
    return running


class RunningLevels(torch.autograd.Function):
    """Every level from the groups' decodes: ``levels[l] = b_dec + sum over g <= l of partials[:, g]``.

    ``partials`` is ``[n_tokens, n_groups, d_in]`` (as the group decode
    writes it); the levels come out level-major, ``[n_levels, n_tokens, d_in]``
    and contiguous, so that every level's loss reads contiguous memory. With
    ``detach``, level ``l`` is level ``l - 1`` detached plus its own group, so
    its loss reaches only that group (and ``b_dec`` only through level 0).
    Forward and backward are one running sum each, level by level, every step
    a row-wise add: ``cumsum`` over a short middle dimension, a transpose copy
    and autograd's reversed running sum cost several times more on CPU.
    """

    @staticmethod
    def forward(
        ctx: Any, partials: torch.Tensor, b_dec: torch.Tensor, detach: bool
    ) -> torch.Tensor:
        ctx.detach = detach
        n_tokens, n_levels, d_in = partials.shape
        levels = partials.new_empty(n_levels, n_tokens, d_in)
        _running_sums(partials.unbind(1), levels.unbind(0), b_dec)
        return levels

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if ctx.detach:
            return grad.transpose(0, 1), grad[0].sum(dim=0), None
        # partial g reaches every level l >= g: the suffix sums of the levels' gradients
        n_levels, n_tokens, d_in = grad.shape
        reach = grad.new_empty(n_tokens, n_levels, d_in)
        whole = _running_sums(grad.unbind(0)[::-1], reach.unbind(1)[::-1], None)
        return reach, whole.sum(dim=0).to(grad.dtype), None
