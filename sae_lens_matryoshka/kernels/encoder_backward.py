"""Selected pre-activations with an encoder backward that touches only the selected latents."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from sae_lens_matryoshka.kernels.entry_sets import LaterGradients
from sae_lens_matryoshka.kernels.kept_memory import empty_gradient
from sae_lens_matryoshka.kernels.measured import MeasuredKernel, entries_per_token
from sae_lens_matryoshka.kernels.threads import single_thread

# torch warns once per process that its CSR support is in beta; the CSR products
# used here are tested, so that one warning is spent here, silently
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), (0, 0)
    )


def row_starts(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Where each row starts in the non-decreasing ``rows``: ``[n_rows + 1]``, the last is ``len(rows)``."""
    return torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))


def narrowest_int_dtype(bound: int) -> torch.dtype:
    """The narrowest signed integer type holding ``0 .. bound - 1``."""
    for dtype in (torch.int16, torch.int32):
        if bound - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def latent_major_order(latent: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The entries' positions sorted by latent, stably: ``torch.argsort(latent, stable=True)``.

    The same permutation, computed where it is cheapest and safest on CPU.
    There torch sorts 32,768 or more integers with a parallel radix sort,
    one pass per byte of their type (eight for ``int64``, whatever their
    range), whose threads wait for each other several times per pass: on
    cores shared with other processes each wait can last a scheduler tick,
    and the ~1 ms sort of a step's entries took 160 ms (see
    ``benchmarks/step_profile.py``). So the keys are narrowed to the
    smallest integer type that holds ``d_sae`` (two passes up to 32,768
    latents) and sorted on one thread, whose passes wait for no one.
    """
    key = latent.to(narrowest_int_dtype(d_sae))
    with single_thread() if latent.device.type == "cpu" else contextlib.nullcontext():
        return torch.argsort(key, stable=True)


class EntryOrder:
    """The latent-major order of a set of token-major entries, computed once, when first asked for.

    The gradients of ``W_enc`` and ``W_dec`` are sums per latent over the
    entries, so both need the entries grouped by latent, a transpose of the
    token-major order the selection gives; one object, handed to both,
    sorts them once (:func:`latent_major_order`), in the backward pass.
    """

    def __init__(self, latent: torch.Tensor, d_sae: int) -> None:
        self.latent = latent
        self.d_sae = d_sae

    @functools.cached_property
    def order(self) -> torch.Tensor:
        """The entries' positions, by latent, token order kept within a latent."""
        return latent_major_order(self.latent, self.d_sae)

    def by_latent(self, per_entry: torch.Tensor) -> torch.Tensor:
        """``per_entry`` (a value per entry, token-major) in latent-major :attr:`order`.

        ``index_select``: on CPU it gathers a dead-latent loss's 786,432
        entries in about half the time indexing (``per_entry[order]``) takes.
        """
        return per_entry.index_select(0, self.order)

    @functools.cached_property
    def starts(self) -> torch.Tensor:
        """Where each latent's entries start in :attr:`order`: ``[d_sae + 1]``, the last is their count."""
        counts = torch.bincount(self.latent, minlength=self.d_sae)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class EncoderEntries(NamedTuple):
    """One set of a step's token-major entries and their values' gradient: what ``W_enc``'s gradient sums."""

    token: torch.Tensor
    latent: torch.Tensor
    #: the gradient of each entry's value
    grad: torch.Tensor
    #: the entries' latent-major order where another backward shares it, else None
    order: EntryOrder | None = None

    def ordered(self, d_sae: int) -> EntryOrder:
        """The entries' latent-major order: the shared one, or one of their own."""
        return EntryOrder(self.latent, d_sae) if self.order is None else self.order


def csr_weight_grad(
    sae_in: torch.Tensor, entries: Sequence[EncoderEntries], out: torch.Tensor
) -> torch.Tensor:
    """``sae_in.T @ G`` as sparse-dense products with ``G``'s compressed form, one per set (see :func:`encoder_weight_grad`).

    On CPU torch computes a dense-times-sparse product through ``G``'s
    transpose, ``G`` in CSC form: handed ``G``'s CSR form (the token-major
    entries as they are) it converts it with an internal sort of the
    entries; handed the CSC form built from the entries' shared latent-major
    order it sorts nothing and computes the same product, bit for bit.
    Elsewhere ``G`` goes in CSR form. The first set's product is written into
    ``out``, each later set's added to it.
    """
    dtype, d_sae = out.dtype, out.shape[1]
    shape = (sae_in.shape[0], d_sae)
    # written in place over the uninitialised output (beta=0 ignores it, NaN
    # included): a plain mm zero-fills its result and copies the product over
    # it. A backward under autocast would cast the product back to bfloat16.
    with torch.autocast(sae_in.device.type, enabled=False):
        for number, part in enumerate(entries):
            if sae_in.device.type == "cpu":
                order = part.ordered(d_sae)
                matrix = torch.sparse_csc_tensor(
                    order.starts,
                    order.by_latent(part.token),
                    order.by_latent(part.grad.to(dtype)),
                    shape,
                    check_invariants=False,
                )
            else:
                matrix = torch.sparse_csr_tensor(
                    row_starts(part.token, sae_in.shape[0]),
                    part.latent,
                    part.grad.to(dtype),
                    shape,
                    check_invariants=False,
                )
            out.addmm_(sae_in.t().to(dtype), matrix, beta=0 if number == 0 else 1)
    return out


#: latents per block of the bagged ``W_enc`` gradient on CPU: a block's ``[block, d_in]``
#: sums (1.5 MiB at d_in 768, float32) stay in cache while they are copied transposed
BAG_BLOCK = 512


def bagged_weight_grad(
    sae_in: torch.Tensor, entries: Sequence[EncoderEntries], out: torch.Tensor
) -> torch.Tensor:
    """``sae_in.T @ G`` as ``embedding_bag``s over the entries sorted by latent (see :func:`encoder_weight_grad`).

    Column ``j`` of the gradient is the sum of the input rows of latent
    ``j``'s entries weighted by their gradients: one bag per latent, in each
    set's latent-major order. The bags give rows, ``[d_sae, d_in]``, and
    ``out`` is ``W_enc``'s layout, ``[d_in, d_sae]``: on CPU the latents go in
    blocks of :data:`BAG_BLOCK`, each block's rows (summed over the sets)
    copied transposed into its columns of ``out`` while they are in cache (one
    whole ``[d_sae, d_in]`` result and its transposing copy took 53 ms where
    the blocks take 18, on one 2-thread AMD EPYC at the default benchmark
    size, and a fresh 48 MiB to fault in). The blocks' first entries are read
    from each set's order (CPU memory: no synchronisation). On other devices,
    where that read would wait for the device, it is one block. The sums are
    the same either way, bit for bit, and the same as summing each set's
    whole gradient afterwards.
    """
    dtype, d_sae = out.dtype, out.shape[1]
    table = sae_in.to(dtype)
    block = BAG_BLOCK if sae_in.device.type == "cpu" else d_sae
    firsts = list(range(0, d_sae, block))
    sets = [_LatentBags.in_blocks(part, dtype, d_sae, firsts) for part in entries]
    with torch.autocast(sae_in.device.type, enabled=False):
        for number, first in enumerate(firsts):
            last = min(first + block, d_sae)
            sums = sets[0].block_sums(table, number, first, last)
            for later in sets[1:]:
                sums += later.block_sums(table, number, first, last)
            out[:, first:last].copy_(sums.t())
    return out


class _LatentBags(NamedTuple):
    """One set's entries as bags per latent, and where each block of latents' entries start."""

    tokens: torch.Tensor
    weights: torch.Tensor
    order: EntryOrder
    #: each block's first entry, then the entries' end
    bounds: list[int]

    @classmethod
    def in_blocks(
        cls, part: EncoderEntries, dtype: torch.dtype, d_sae: int, firsts: list[int]
    ) -> _LatentBags:
        """``part``'s entries by latent, in blocks of latents starting at ``firsts``."""
        order = part.ordered(d_sae)
        # read only where there are several blocks (CPU memory there)
        many = len(firsts) > 1
        bounds = order.starts[[*firsts, d_sae]].tolist() if many else [0, len(part.token)]
        tokens, weights = order.by_latent(part.token), order.by_latent(part.grad.to(dtype))
        return cls(tokens, weights, order, bounds)

    def block_sums(self, table: torch.Tensor, number: int, first: int, last: int) -> torch.Tensor:
        """Latents ``[first, last)``'s rows, ``[last - first, d_in]``: block ``number``."""
        start, stop = self.bounds[number], self.bounds[number + 1]
        sums: torch.Tensor = torch.nn.functional.embedding_bag(
            self.tokens[start:stop],
            table,
            self.order.starts[first:last] - start,
            mode="sum",
            per_sample_weights=self.weights[start:stop],
        )
        return sums


#: the ``W_enc`` gradient's implementations; the faster is measured per shape where it runs
ENCODER_WEIGHT_GRAD = MeasuredKernel(
    "encoder_weight_grad", {"csr": csr_weight_grad, "bagged": bagged_weight_grad}
)


def weight_grad_dtype(sae_in: torch.Tensor) -> torch.dtype:
    """The ``W_enc`` gradient's dtype: at least float32 (sparse products have no bfloat16 kernel on CPU)."""
    return torch.promote_types(sae_in.dtype, torch.float32)


def encoder_weight_grad(
    sae_in: torch.Tensor,
    entries: Sequence[EncoderEntries],
    d_sae: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sae_in.T @ G`` with ``G [n_tokens, d_sae]`` holding each set's ``grad`` at its (token-major) entries, summed.

    The gradient of ``W_enc [d_in, d_sae]``, in its own layout, computed in at
    least float32 (sparse products have no bfloat16 kernel on CPU), by the
    faster of :func:`csr_weight_grad` and :func:`bagged_weight_grad` for these
    shapes (``kernels.measured``): which is faster depends on the machine and
    on how many entries each token has (on one CPU at d_in 768, d_sae 16384,
    2048 tokens: before the bags went in blocks, the CSR product for ``k`` =
    40 per token, 25 ms against 63, and the bags for the dead-latent loss's
    384, 117 against 301; in blocks, the bags for both, 18-32 ms against the
    CSR product's 40-49 and 68 against 290-364). Several sets (the
    reconstruction's and the dead-latent loss's entries, ``entry_sets``) give
    one gradient, in one call. A set's ``order``: the entries' latent-major
    order, if the caller shares one (:class:`EntryOrder`): the bagged
    candidate uses it, and on CPU the CSR one. Sorted on the first call, it
    is left out of the candidates' timing. ``out``: where to write it
    (``[d_in, d_sae]``, contiguous, uninitialised; a kept gradient's memory,
    :func:`~.kept_memory.empty_gradient`), else new memory.
    """
    if out is None:
        out = sae_in.new_empty(sae_in.shape[1], d_sae, dtype=weight_grad_dtype(sae_in))
    entries = [part._replace(order=part.ordered(d_sae)) for part in entries]
    per_token = tuple(entries_per_token(len(part.token), sae_in.shape[0]) for part in entries)
    key = (tuple(sae_in.shape), d_sae, per_token, sae_in.dtype, sae_in.device)
    return ENCODER_WEIGHT_GRAD(key, sae_in, entries, out)


class SparseEncoderValues(torch.autograd.Function):
    """Selected pre-activations ``sae_in[t] @ W_enc[:, j] + b_enc[j]``, given, with a sparse backward.

    ``values`` are computed without a graph (read from the dense
    pre-activations the selection ranked, so they are bit-identical to the
    dense path's); this gives them the gradient of that formula, where
    ``sae_in = x - shift`` is the processed input (``shift`` is ``b_dec`` when
    it is subtracted from the input, else None). Backward touches only the
    selected latents: ``W_enc``'s gradient is :func:`encoder_weight_grad`,
    written into the memory of an earlier step's (``kernels.kept_memory``),
    ``b_enc``'s sums the gradient per latent, and ``shift``'s is
    ``-W_enc @ (b_enc's gradient)``: the input is data, so its per-token
    gradient is never needed, only its sum, which reaches ``b_dec``.
    ``order`` is the entries' latent-major order when the decode of the same
    entries shares it (:class:`EntryOrder`), else None.

    The step's first set of entries: it returns ``(values, link)``, and later
    sets of the same pre-activations (:class:`LaterEncoderValues`, the
    dead-latent loss's) take the link and leave their gradients in ``later``,
    which this backward sums with its own, in one ``W_enc`` gradient
    (``kernels.entry_sets``).
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
        order: EntryOrder | None,
        later: LaterGradients[EncoderEntries],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(sae_in, W_enc, token, latent)
        ctx.order = order
        ctx.later = later
        return values.clone(), values.new_empty(0)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, grad_link: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        del grad_link  # empty: what later sets hand on is in ctx.later
        sae_in, W_enc, token, latent = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        entries = [EncoderEntries(token, latent, grad, ctx.order), *ctx.later.take()]
        entries = [part._replace(grad=part.grad.to(W_enc.dtype)) for part in entries]
        grad_shift = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=grad.device)
            for part in entries:
                grad_b_enc.index_add_(0, part.latent, part.grad)
        if ctx.needs_input_grad[2]:
            grad_shift = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[3]:
            out = empty_gradient(W_enc, weight_grad_dtype(sae_in))
            grad_W_enc = encoder_weight_grad(sae_in, entries, d_sae, out).to(W_enc.dtype)
        return None, None, grad_shift, grad_W_enc, grad_b_enc, None, None, None, None


class LaterEncoderValues(torch.autograd.Function):
    """A later set of selected pre-activations of the same step: gradients left for the first set's backward.

    The same values as :class:`SparseEncoderValues` gives (cloned, no
    gradient of their own to ``W_enc``, ``b_enc`` or the shift); ``link`` is
    the first set's, so autograd runs this backward before that one, which
    sums the entries and gradients left in ``later`` with its own.
    """

    @staticmethod
    def forward(
        ctx: Any,
        values: torch.Tensor,
        link: torch.Tensor,  # noqa: ARG004 (an input so that the first set's backward waits)
        token: torch.Tensor,
        latent: torch.Tensor,
        order: EntryOrder | None,
        later: LaterGradients[EncoderEntries],
    ) -> torch.Tensor:
        ctx.save_for_backward(token, latent)
        ctx.order = order
        ctx.later = later
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        token, latent = ctx.saved_tensors
        ctx.later.leave(EncoderEntries(token, latent, grad, ctx.order))
        return None, grad.new_empty(0), None, None, None, None
