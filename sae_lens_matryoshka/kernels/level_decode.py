"""Every Matryoshka level's reconstruction at once: densely, or from token-major entries.

A Matryoshka SAE with widths ``m_1 < m_2 < ... < m_L = d_sae`` reconstructs the
input once per level, level ``l`` using only latents ``< m_l``. Latents between
two consecutive widths form a *group*; a level's reconstruction is the sum of
the decodes of the groups it contains. Decoding each group once and taking a
running sum gives every level's reconstruction for the cost of a single full
decode, instead of decoding the whole prefix again per level.

From token-major entries the groups' decode is a sparse product, ``G @ W_dec``
with ``G [n_tokens * n_groups, d_sae]`` holding each entry's value in its
(token, group) row, and ``W_dec``'s gradient is ``G.T @ grad``. Each can be
one ``embedding_bag`` (a bag per row) or one CSR product, and which is faster
depends on the machine, the shapes and the entries per token, as it does for
the encoder's gradient of the same entries (``encoder_backward``), where the
CSR product was the faster on a CPU on which the bags win here: on one
2-thread AMD EPYC at the default benchmark size (d_in 768, d_sae 16384, 2048
tokens, k 40, five groups) the bags took 24 ms for the decode against the CSR
product's 26, and 27 ms for ``W_dec``'s gradient against 34. The values'
gradient (the output gradient dotted with each entry's ``W_dec`` row) is
torch's ``embedding_bag`` kernel or a sampled product, token by token or
latent by latent: 24, 20 and 13 ms at 40 entries per token, 195, 170-190 and
58 at the dead-latent loss's 384 (latent by latent each ``W_dec`` row is read
once, and the rows gathered per entry are the output gradient's, which stay
in cache). So each is a :class:`~sae_lens_matryoshka.kernels.measured.MeasuredKernel`
(``group_decode``, ``decoder_weight_grad``, ``decode_values_grad``), timed
where it runs and kept.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sae_lens_matryoshka.kernels.encoder_backward import EntryOrder, row_starts
from sae_lens_matryoshka.kernels.entry_sets import EntrySets, LaterGradients
from sae_lens_matryoshka.kernels.kept_memory import empty_gradient
from sae_lens_matryoshka.kernels.measured import MeasuredKernel, entries_per_token


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
    sets: EntrySets[DecodeEntries] | None = None,
) -> torch.Tensor:
    """Each token's decode of each Matryoshka group, ``[n_tokens, n_groups, d_in]``.

    Group ``g`` holds the latents between ``bounds[g - 1]`` and ``bounds[g]``
    (the inner level widths). Entry ``(t, g)`` sums ``values[i] * W_dec[latent[i]]``
    over the token's entries in the group: row ``t * n_groups + g`` of a sparse
    product whose rows (bags) the token-major entries already list in order.
    With a float32 or float64 ``W_dec`` on CPU, under autograd, it is
    :class:`GroupDecode`, whose forward and both gradients are measured
    kernels and whose backward takes the entries' latent-major ``order``
    (shared with the encoder's backward, else its own). ``sets``: the step's
    sets of entries decoded through ``W_dec`` (``kernels.entry_sets``): the
    first decode with a graph is :class:`GroupDecode`, each later one
    :class:`LaterGroupDecode`, whose ``W_dec`` gradients the first one's
    backward computes with its own, in one kernel call.

    Elsewhere it is torch's ``embedding_bag``, forward and backward. For
    bfloat16 or float16 weights, because torch's backward rounds every addition
    to ``W_dec`` and :class:`GroupDecode`'s would round once: they keep torch's
    results. On a GPU, because torch's sort has none of the CPU's thread stalls
    and :class:`GroupDecode` (torch's private embedding-bag ops) has not run on
    one. Without a graph (evaluation), because there is no backward to spare a
    sort, and a decode whose result depends on no timing gives every machine
    the same evaluation.
    """
    n_groups = bounds.numel() + 1
    bag = token * n_groups + torch.bucketize(latent, bounds, right=True)
    starts = row_starts(bag, n_tokens * n_groups)
    values = values.to(W_dec.dtype)
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad)
    on_cpu = W_dec.device.type == "cpu"
    if needs_grad and on_cpu and W_dec.dtype in (torch.float32, torch.float64):
        order = EntryOrder(latent, W_dec.shape[0]) if order is None else order
        key = decode_key(W_dec, n_tokens, n_groups, len(latent))
        sets = EntrySets() if sets is None else sets
        if sets.link is not None:
            out = LaterGroupDecode.apply(
                values, sets.link, W_dec.detach(), latent, bag, starts, order, key, sets.later
            )
        else:
            out, link = GroupDecode.apply(
                values, W_dec, latent, bag, starts, order, key, sets.later
            )
            sets.link = link
    else:
        out = F.embedding_bag(latent, W_dec, starts[:-1], mode="sum", per_sample_weights=values)
    return out.view(n_tokens, n_groups, -1)


def decode_key(
    W_dec: torch.Tensor, n_tokens: int, n_groups: int, n_entries: int
) -> tuple[int, int, tuple[int, ...], int, torch.dtype, torch.device]:
    """What the decode kernels' speed depends on: the shapes, the entries per token, dtype, device."""
    per_token = entries_per_token(n_entries, n_tokens)
    return (n_tokens, n_groups, tuple(W_dec.shape), per_token, W_dec.dtype, W_dec.device)


def bagged_group_decode(
    values: torch.Tensor, W_dec: torch.Tensor, latent: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """``G @ W_dec`` as one ``embedding_bag``, a bag per row of ``G`` (see :func:`decode_groups`).

    Torch's own forward, as ``F.embedding_bag(..., mode="sum")`` computes it,
    without the bookkeeping its backward would need (this backward is
    :class:`GroupDecode`'s).
    """
    out: torch.Tensor = torch.ops.aten._embedding_bag(
        W_dec, latent, starts[:-1], False, 0, False, values, False, -1
    )[0]
    return out


def csr_group_decode(
    values: torch.Tensor, W_dec: torch.Tensor, latent: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """``G @ W_dec`` as one sparse-dense product with ``G`` in CSR form (see :func:`decode_groups`).

    The token-major entries are ``G``'s CSR form as they are (a row per bag,
    latents increasing within it): nothing is sorted or copied to build it.
    Written over an uninitialised output (``beta=0`` ignores it, NaN included,
    and writes the empty bags' zero rows), as a plain ``mm`` would zero-fill it
    first; outside autocast, which would multiply in bfloat16.
    """
    n_bags = starts.numel() - 1
    matrix = torch.sparse_csr_tensor(
        starts, latent, values, (n_bags, W_dec.shape[0]), check_invariants=False
    )
    out = W_dec.new_empty(n_bags, W_dec.shape[1])
    with torch.autocast(W_dec.device.type, enabled=False):
        return out.addmm_(matrix, W_dec, beta=0)


#: the groups' decode (``G @ W_dec``); the faster is measured per shape where it runs
GROUP_DECODE = MeasuredKernel(
    "group_decode", {"bagged": bagged_group_decode, "csr": csr_group_decode}
)


class DecodeEntries(NamedTuple):
    """One set of a step's decoded entries with its output gradient: what ``W_dec``'s gradient sums."""

    #: the gradient of the set's decode, a row per bag
    grad: torch.Tensor
    values: torch.Tensor
    #: each entry's bag (its row of ``grad``)
    bag: torch.Tensor
    #: the entries' latent-major order
    order: EntryOrder
    #: the set's :func:`decode_key`
    key: Hashable


def bagged_decoder_weight_grad(entries: Sequence[DecodeEntries], out: torch.Tensor) -> torch.Tensor:
    """``G.T @ grad`` as one ``embedding_bag`` per set over its output gradient's rows, a bag per latent.

    The entries in latent-major order list each latent's bags: the terms
    torch's ``embedding_bag`` backward adds, in the order it adds them (see
    :class:`GroupDecode`). ``embedding_bag`` writes only into memory of its
    own, so the first set's result is copied into ``out`` and each later
    set's added to it (as autograd would sum separate gradients).
    """
    with torch.autocast(out.device.type, enabled=False):
        for number, part in enumerate(entries):
            per_latent = F.embedding_bag(
                part.order.by_latent(part.bag),
                part.grad,
                part.order.starts[:-1],
                mode="sum",
                per_sample_weights=part.order.by_latent(part.values),
            )
            if number == 0:
                out.copy_(per_latent)
            else:
                out.add_(per_latent)
    return out


def csr_decoder_weight_grad(entries: Sequence[DecodeEntries], out: torch.Tensor) -> torch.Tensor:
    """``G.T @ grad`` as one sparse-dense product per set with ``G.T`` in CSR form, built from its order.

    ``G.T``'s CSR form is the entries in latent-major order, a row per
    latent: the same gather the bagged form makes, and no sort. The first
    set's product is written over the uninitialised ``out``, each later one's
    added to it, outside autocast (see :func:`csr_group_decode`).
    """
    with torch.autocast(out.device.type, enabled=False):
        for number, part in enumerate(entries):
            matrix = torch.sparse_csr_tensor(
                part.order.starts,
                part.order.by_latent(part.bag),
                part.order.by_latent(part.values),
                (part.order.d_sae, part.grad.shape[0]),
                check_invariants=False,
            )
            out.addmm_(matrix, part.grad, beta=0 if number == 0 else 1)
    return out


#: ``W_dec``'s gradient (``G.T @ grad``); the faster is measured per shape where it runs
DECODER_WEIGHT_GRAD = MeasuredKernel(
    "decoder_weight_grad",
    {"bagged": bagged_decoder_weight_grad, "csr": csr_decoder_weight_grad},
)


def bagged_decode_values_grad(
    grad: torch.Tensor,
    W_dec: torch.Tensor,
    latent: torch.Tensor,
    bag: torch.Tensor,
    starts: torch.Tensor,
    order: EntryOrder,
) -> torch.Tensor:
    """Each entry's output gradient dotted with its ``W_dec`` row: torch's ``embedding_bag`` kernel.

    Handed the entries' bags (the ``offset2bag`` torch's forward would have
    made), so it needs nothing from whichever forward candidate ran.
    """
    del order  # token-major, as the entries come
    values_grad: torch.Tensor = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad, W_dec, latent, starts[:-1], bag, 0, -1
    )
    return values_grad


def sampled_decode_values_grad(
    grad: torch.Tensor,
    W_dec: torch.Tensor,
    latent: torch.Tensor,
    bag: torch.Tensor,
    starts: torch.Tensor,
    order: EntryOrder,
) -> torch.Tensor:
    """The same dot products as ``grad @ W_dec.T`` sampled at ``G``'s entries (``sampled_addmm``).

    ``G``'s CSR form is the token-major entries as they are; only its
    pattern counts (``beta=0``), so its values are zeros. Outside autocast,
    which would multiply in bfloat16.
    """
    del bag, order  # the CSR rows say each entry's bag
    pattern = torch.sparse_csr_tensor(
        starts,
        latent,
        grad.new_zeros(latent.numel()),
        (grad.shape[0], W_dec.shape[0]),
        check_invariants=False,
    )
    with torch.autocast(grad.device.type, enabled=False):
        return torch.sparse.sampled_addmm(pattern, grad, W_dec.t(), beta=0).values()


def latent_major_decode_values_grad(
    grad: torch.Tensor,
    W_dec: torch.Tensor,
    latent: torch.Tensor,
    bag: torch.Tensor,
    starts: torch.Tensor,
    order: EntryOrder,
) -> torch.Tensor:
    """The same dot products sampled latent by latent: ``W_dec @ grad.T`` at ``G.T``'s entries.

    ``G.T``'s CSR form is the entries in latent-major ``order`` (as for
    ``W_dec``'s gradient), so each ``W_dec`` row is read once for all of its
    entries and the rows gathered per entry are the output gradient's
    (``[n_bags, d_in]``, a few MiB, in cache) instead of ``W_dec``'s (tens of
    MiB): on one 2-thread AMD EPYC at the dead-latent loss's 384 entries per
    token (d_in 768, d_sae 16,384, 2048 tokens) 50 ms, against 113-143 for the
    token-major product and 137 for the ``embedding_bag`` kernel. Each dot
    product is the token-major one's, bit for bit (the same two rows, the
    same reduction); they are put back in the entries' token-major order.
    """
    del latent, starts  # the latent-major order says each entry's latent
    pattern = torch.sparse_csr_tensor(
        order.starts,
        order.by_latent(bag),
        grad.new_zeros(bag.numel()),
        (order.d_sae, grad.shape[0]),
        check_invariants=False,
    )
    with torch.autocast(grad.device.type, enabled=False):
        dots = torch.sparse.sampled_addmm(pattern, W_dec, grad.t(), beta=0).values()
    return torch.empty_like(dots).index_copy_(0, order.order, dots)


#: the values' gradient of the groups' decode; the fastest is measured per shape where it runs
DECODE_VALUES_GRAD = MeasuredKernel(
    "decode_values_grad",
    {
        "bagged": bagged_decode_values_grad,
        "sampled": sampled_decode_values_grad,
        "sampled_by_latent": latent_major_decode_values_grad,
    },
)


class GroupDecode(torch.autograd.Function):
    """``F.embedding_bag(latent, W_dec, starts[:-1], mode="sum", per_sample_weights=values)``, with its gradients.

    The forward is :data:`GROUP_DECODE`, ``W_dec``'s gradient
    :data:`DECODER_WEIGHT_GRAD`: each the faster, where it runs, of one
    ``embedding_bag`` and one CSR product (``kernels.measured``; ``key`` is
    :func:`decode_key`'s), the gradient written into the memory of an
    earlier step's (``kernels.kept_memory``). The values' gradient, each entry's output gradient
    dotted with its ``W_dec`` row, is :data:`DECODE_VALUES_GRAD`: torch's own
    ``embedding_bag`` kernel or a sampled CSR product (``sampled_addmm``) over
    the token-major entries or over their latent-major ``order``, each handed
    what it needs from the entries, nothing from the forward, whichever
    candidate ran.

    ``W_dec``'s gradient is computed without torch's backward's sort. That
    backward sorts the entries by latent (``indices.sort()``; on CPU from
    32,768 entries a parallel radix sort whose threads wait for each other at
    every pass, see ``encoder_backward.latent_major_order``) and adds each
    entry's weighted output gradient to its latent's row, in that order. Here
    the order is
    :class:`~sae_lens_matryoshka.kernels.encoder_backward.EntryOrder`'s,
    shared with the encoder's backward, and both candidates read it. The
    bagged one adds the same terms in the same order as torch's backward, so
    with it (and the bagged forward) this is torch's ``embedding_bag`` bit for
    bit in float32 and float64, wherever torch's sort is stable (on CPU from
    32,768 entries; below, its sort leaves a latent's entries in an order of
    its own and the last bits of ``W_dec``'s gradient differ). The CSR
    candidates sum in another order: equal up to rounding. For weights in
    bfloat16 this would sum in float32 and round once, where torch's backward
    rounds every addition: :func:`decode_groups` leaves those to torch.

    The step's first decoded set of entries: it returns ``(out, link)``, and
    later sets (:class:`LaterGroupDecode`, the dead-latent loss's) take the
    link and leave their output gradients in ``later``, which this backward
    sums with its own in one ``W_dec`` gradient (``kernels.entry_sets``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        W_dec: torch.Tensor,
        latent: torch.Tensor,
        bag: torch.Tensor,
        starts: torch.Tensor,
        order: EntryOrder,
        key: Hashable,
        later: LaterGradients[DecodeEntries],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(values, W_dec, latent, bag, starts)
        ctx.order = order
        ctx.key = key
        ctx.later = later
        out: torch.Tensor = GROUP_DECODE(key, values, W_dec, latent, starts)
        return out, out.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor, grad_link: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        del grad_link  # empty: what later sets hand on is in ctx.later
        values, W_dec, latent, bag, starts = ctx.saved_tensors
        grad = grad.contiguous()
        entries = [DecodeEntries(grad, values, bag, ctx.order, ctx.key), *ctx.later.take()]
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = DECODE_VALUES_GRAD(ctx.key, grad, W_dec, latent, bag, starts, ctx.order)
        if ctx.needs_input_grad[1]:
            out = empty_gradient(W_dec, W_dec.dtype)
            key = tuple(part.key for part in entries)
            grad_W_dec = DECODER_WEIGHT_GRAD(key, entries, out)
        return grad_values, grad_W_dec, None, None, None, None, None, None


class LaterGroupDecode(torch.autograd.Function):
    """A later set's decode of the same step: its ``W_dec`` gradient left for the first set's backward.

    The same decode and values' gradient as :class:`GroupDecode` (``W_dec``
    comes detached: no gradient of its own); ``link`` is the first set's, so
    autograd runs this backward before that one, which computes ``W_dec``'s
    gradient over its own entries and those left in ``later``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        link: torch.Tensor,  # noqa: ARG004 (an input so that the first set's backward waits)
        W_dec: torch.Tensor,
        latent: torch.Tensor,
        bag: torch.Tensor,
        starts: torch.Tensor,
        order: EntryOrder,
        key: Hashable,
        later: LaterGradients[DecodeEntries],
    ) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec, latent, bag, starts)
        ctx.order = order
        ctx.key = key
        ctx.later = later
        out: torch.Tensor = GROUP_DECODE(key, values, W_dec, latent, starts)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec, latent, bag, starts = ctx.saved_tensors
        grad = grad.contiguous()
        ctx.later.leave(DecodeEntries(grad, values, bag, ctx.order, ctx.key))
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = DECODE_VALUES_GRAD(ctx.key, grad, W_dec, latent, bag, starts, ctx.order)
        return grad_values, grad.new_empty(0), None, None, None, None, None, None, None


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
