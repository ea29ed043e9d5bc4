"""Selected pre-activations with an encoder backward that touches only the selected latents."""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import torch

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


def csr_weight_grad(
    sae_in: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
    order: EntryOrder | None = None,
) -> torch.Tensor:
    """``sae_in.T @ G`` as one sparse-dense product with ``G``'s compressed form (see :func:`encoder_weight_grad`).

    On CPU torch computes a dense-times-sparse product through ``G``'s
    transpose, ``G`` in CSC form: handed ``G``'s CSR form (the token-major
    entries as they are) it converts it with an internal sort of the
    entries; handed the CSC form built from ``order`` (the entries' shared
    latent-major order) it sorts nothing and computes the same product, bit
    for bit. Elsewhere ``G`` goes in CSR form. Written into ``out``.
    """
    dtype, d_sae = out.dtype, out.shape[1]
    shape = (sae_in.shape[0], d_sae)
    if sae_in.device.type == "cpu":
        order = EntryOrder(latent, d_sae) if order is None else order
        matrix = torch.sparse_csc_tensor(
            order.starts,
            order.by_latent(token),
            order.by_latent(grad.to(dtype)),
            shape,
            check_invariants=False,
        )
    else:
        matrix = torch.sparse_csr_tensor(
            row_starts(token, sae_in.shape[0]),
            latent,
            grad.to(dtype),
            shape,
            check_invariants=False,
        )
    # written in place over the uninitialised output (beta=0 ignores it, NaN
    # included): a plain mm zero-fills its result and copies the product over
    # it. A backward under autocast would cast the product back to bfloat16.
    with torch.autocast(sae_in.device.type, enabled=False):
        return out.addmm_(sae_in.t().to(dtype), matrix, beta=0)


#: latents per block of the bagged ``W_enc`` gradient on CPU: a block's ``[block, d_in]``
#: sums (1.5 MiB at d_in 768, float32) stay in cache while they are copied transposed
BAG_BLOCK = 512


def bagged_weight_grad(
    sae_in: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    grad: torch.Tensor,
    out: torch.Tensor,
    order: EntryOrder | None = None,
) -> torch.Tensor:
    """``sae_in.T @ G`` as ``embedding_bag``s over the entries sorted by latent (see :func:`encoder_weight_grad`).

    Column ``j`` of the gradient is the sum of the input rows of latent
    ``j``'s entries weighted by their gradients: one bag per latent, in the
    entries' latent-major ``order`` (sorted here if not given). The bags give
    rows, ``[d_sae, d_in]``, and ``out`` is ``W_enc``'s layout, ``[d_in,
    d_sae]``: on CPU the latents go in blocks of :data:`BAG_BLOCK`, each
    block's rows copied transposed into its columns of ``out`` while they are
    in cache (one whole ``[d_sae, d_in]`` result and its transposing copy took
    53 ms where the blocks take 18, on one 2-thread AMD EPYC at the default
    benchmark size, and a fresh 48 MiB to fault in). The blocks' first
    entries are read from ``order`` (CPU memory: no synchronisation). On
    other devices, where that read would wait for the device, it is one
    block. The sums are the same either way, bit for bit.
    """
    dtype, d_sae = out.dtype, out.shape[1]
    order = EntryOrder(latent, d_sae) if order is None else order
    tokens, weights = order.by_latent(token), order.by_latent(grad.to(dtype))
    table = sae_in.to(dtype)
    block = BAG_BLOCK if sae_in.device.type == "cpu" else d_sae
    firsts = list(range(0, d_sae, block))
    # each block's first entry, then the entries' end: read only where there are several
    many = len(firsts) > 1
    bounds = order.starts[[*firsts, d_sae]].tolist() if many else [0, len(token)]
    with torch.autocast(sae_in.device.type, enabled=False):
        for first, start, stop in zip(firsts, bounds, bounds[1:], strict=False):
            last = min(first + block, d_sae)
            sums = torch.nn.functional.embedding_bag(
                tokens[start:stop],
                table,
                order.starts[first:last] - start,
                mode="sum",
                per_sample_weights=weights[start:stop],
            )
            out[:, first:last].copy_(sums.t())
    return out


#: the ``W_enc`` gradient's implementations; the faster is measured per shape where it runs
ENCODER_WEIGHT_GRAD = MeasuredKernel(
    "encoder_weight_grad", {"csr": csr_weight_grad, "bagged": bagged_weight_grad}
)


def weight_grad_dtype(sae_in: torch.Tensor) -> torch.dtype:
    """The ``W_enc`` gradient's dtype: at least float32 (sparse products have no bfloat16 kernel on CPU)."""
    return torch.promote_types(sae_in.dtype, torch.float32)


def encoder_weight_grad(
    sae_in: torch.Tensor,
    token: torch.Tensor,
    latent: torch.Tensor,
    grad: torch.Tensor,
    d_sae: int,
    order: EntryOrder | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sae_in.T @ G`` with ``G [n_tokens, d_sae]`` holding ``grad`` at the (token-major) entries.

    The gradient of ``W_enc [d_in, d_sae]``, in its own layout, computed in at
    least float32 (sparse products have no bfloat16 kernel on CPU), by the
    faster of :func:`csr_weight_grad` and :func:`bagged_weight_grad` for this
    shape (``kernels.measured``): which is faster depends on the machine and
    on how many entries each token has (on one CPU at d_in 768, d_sae 16384,
    2048 tokens: before the bags went in blocks, the CSR product for ``k`` =
    40 per token, 25 ms against 63, and the bags for the dead-latent loss's
    384, 117 against 301; in blocks, the bags for both, 18-32 ms against the
    CSR product's 40-49 and 68 against 290-364).
    ``order``: the entries' latent-major order, if the caller shares one
    (:class:`EntryOrder`): the bagged candidate uses it, and on CPU the CSR
    one. Sorted on the first call, it is left out of the candidates' timing.
    ``out``: where to write it (``[d_in, d_sae]``, contiguous, uninitialised;
    a kept gradient's memory, :func:`~.kept_memory.empty_gradient`), else
    new memory.
    """
    if out is None:
        out = sae_in.new_empty(sae_in.shape[1], d_sae, dtype=weight_grad_dtype(sae_in))
    order = EntryOrder(latent, d_sae) if order is None else order
    per_token = entries_per_token(len(token), sae_in.shape[0])
    key = (tuple(sae_in.shape), d_sae, per_token, sae_in.dtype, sae_in.device)
    return ENCODER_WEIGHT_GRAD(key, sae_in, token, latent, grad, out, order)


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
        order: EntryOrder | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, W_enc, token, latent)
        ctx.order = order
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
            out = empty_gradient(W_enc, weight_grad_dtype(sae_in))
            grad_W_enc = encoder_weight_grad(sae_in, token, latent, grad, d_sae, ctx.order, out)
            grad_W_enc = grad_W_enc.to(W_enc.dtype)
        return None, None, grad_shift, grad_W_enc, grad_b_enc, None, None, None
