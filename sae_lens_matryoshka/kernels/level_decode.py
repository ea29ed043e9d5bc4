"""Every Matryoshka level's reconstruction at once: densely, or from token-major entries.

A Matryoshka SAE with widths ``m_1 < m_2 < ... < m_L = d_sae`` reconstructs the
input once per level, level ``l`` using only latents ``< m_l``. Latents between
two consecutive widths form a *group*; a level's reconstruction is the sum of
the decodes of the groups it contains. Decoding each group once and taking a
running sum gives every level's reconstruction for the cost of a single full
decode, instead of decoding the whole prefix again per level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_lens_matryoshka.kernels.encoder_backward import EntryOrder, row_starts


def group_bounds(widths: Sequence[int]) -> list[tuple[int, int]]:
    """The latent range ``[start, end)`` each level adds to the previous one."""
    starts = [0, *widths[:-1]]
    return list(zip(starts, widths, strict=True))


def decode_levels(
    feature_acts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    widths: Sequence[int],
    detach_between_levels: bool = False,
) -> torch.Tensor:
    """Every level's reconstruction in one pass, shape ``[n_levels, *batch, d_in]``.

    Entry ``l`` is ``feature_acts[..., :widths[l]] @ W_dec[:widths[l]] + b_dec``.
    Each group of latents is multiplied with its decoder rows once and the
    levels are the running sum over groups, so the cost is one full decode.

    With ``detach_between_levels``, level ``l`` adds its own group to a detached
    copy of level ``l - 1``: its loss then reaches only the latents (and
    decoder rows) that level ``l - 1`` lacked.
    """
    sizes = [end - start for start, end in group_bounds(widths)]
    # split (not slicing) so that backward concatenates the groups' gradients
    # once instead of scattering each into a zero-filled full-width tensor
    groups = zip(feature_acts.split(sizes, dim=-1), W_dec.split(sizes, dim=0), strict=True)
    partials = torch.stack([acts @ rows for acts, rows in groups])
    reconstructions = partials.cumsum(dim=0) + b_dec
    if detach_between_levels:
        previous = reconstructions[:-1].detach()
        reconstructions = torch.cat([reconstructions[:1], previous + partials[1:]])
    return reconstructions


def decode_groups(
    values: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    W_dec: torch.Tensor,
    n_tokens: int,
    bounds: torch.Tensor,
    order: EntryOrder | None = None,
) -> torch.Tensor:
    """Each token's decode of each Matryoshka group, ``[n_tokens, n_groups, d_in]``.

    Group ``g`` holds the latents between ``bounds[g - 1]`` and ``bounds[g]``
    (the inner level widths). Entry ``(t, g)`` sums ``values[i] * W_dec[latent[i]]``
    over the token's entries in the group: one ``embedding_bag``, whose bags
    ``t * n_groups + g`` the token-major entries already list in order. With
    a float32 or float64 ``W_dec`` on CPU its backward is :class:`GroupDecode`'s,
    which takes the entries' latent-major ``order`` (shared with the
    encoder's backward, else its own).
    """
    n_groups = bounds.numel() + 1
    bag = token * n_groups + torch.bucketize(latent, bounds, right=True)
    offsets = row_starts(bag, n_tokens * n_groups)[:-1]
    values = values.to(W_dec.dtype)
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad)
    # torch's backward rounds every addition to a bfloat16 or float16 W_dec, this
    # one would round once: those keep torch's backward, and their results. Off the
    # CPU torch's sort has none of the CPU's thread stalls, and this path (torch's
    # private embedding-bag ops) has not run on a GPU: torch's backward stays there
    on_cpu = W_dec.device.type == "cpu"
    if needs_grad and on_cpu and W_dec.dtype in (torch.float32, torch.float64):
        order = EntryOrder(latent, W_dec.shape[0]) if order is None else order
        out = GroupDecode.apply(values, W_dec, latent, bag, offsets, order)
    else:
        out = F.embedding_bag(latent, W_dec, offsets, mode="sum", per_sample_weights=values)
    return out.view(n_tokens, n_groups, -1)


class GroupDecode(torch.autograd.Function):
    """``F.embedding_bag(latent, W_dec, offsets, mode="sum", per_sample_weights=values)``, with its gradients.

    Torch's own forward and values' gradient, and ``W_dec``'s gradient
    without torch's backward's sort. That backward sorts the entries by
    latent (``indices.sort()``; on CPU from 32,768 entries a parallel radix
    sort whose threads wait for each other at every pass, see
    ``encoder_backward.latent_major_order``) and adds each entry's weighted
    output gradient to its latent's row, in that order. Here the order is
    :class:`~sae_lens_matryoshka.kernels.encoder_backward.EntryOrder`'s,
    shared with the encoder's backward, and the sums are one forward
    ``embedding_bag`` over the output gradient's rows, one bag per latent:
    the same terms added in the same order, so in float32 and float64 the
    same gradient bit for bit wherever torch's sort is stable (on CPU from
    32,768 entries; below, its sort leaves a latent's entries in an order
    of its own and the last bits differ). For weights in bfloat16 it would
    sum in float32 and round once, where torch's backward rounds every
    addition: :func:`decode_groups` leaves those to torch.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        W_dec: torch.Tensor,
        latent: torch.Tensor,
        bag: torch.Tensor,
        offsets: torch.Tensor,
        order: EntryOrder,
    ) -> torch.Tensor:
        # offset2bag comes back empty from the sum fast path; the values' gradient
        # kernel then rebuilds it, as it does inside torch's own backward
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(
            W_dec, latent, offsets, False, 0, False, values, False, -1
        )
        ctx.save_for_backward(values, W_dec, latent, bag, offsets, offset2bag)
        ctx.order = order
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec, latent, bag, offsets, offset2bag = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, latent, offsets, offset2bag, 0, -1
            )
        if ctx.needs_input_grad[1]:
            order: EntryOrder = ctx.order
            with torch.autocast(grad.device.type, enabled=False):
                grad_W_dec = F.embedding_bag(
                    bag[order.order],
                    grad,
                    order.starts[:-1],
                    mode="sum",
                    per_sample_weights=values[order.order],
                )
        return grad_values, grad_W_dec, None, None, None, None


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
    """Every level's reconstruction from the groups' decodes: ``b_dec + sum over g <= l of partials[:, g]``.

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
        reconstructions = partials.new_empty(n_levels, n_tokens, d_in)
        _running_sums(partials.unbind(1), reconstructions.unbind(0), b_dec)
        return reconstructions

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        if ctx.detach:
            return grad.transpose(0, 1), grad[0].sum(dim=0), None
        # partial g reaches every level l >= g: the suffix sums of the levels' gradients
        n_levels, n_tokens, d_in = grad.shape
        reach = grad.new_empty(n_tokens, n_levels, d_in)
        whole = _running_sums(grad.unbind(0)[::-1], reach.unbind(1)[::-1], None)
        return reach, whole.sum(dim=0).to(grad.dtype), None
