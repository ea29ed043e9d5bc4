"""Selected pre-activations with an encoder backward that touches only the selected latents."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sae_lens_matryoshka.kernels.measured import MeasuredKernel

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


def csr_weight_grad(
    sae_in: torch.Tensor, token: torch.Tensor, latent: torch.Tensor, grad: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """``sae_in.T @ G`` as one sparse-dense product with ``G``'s CSR form (see :func:`encoder_weight_grad`).

    The token-major entries are ``G``'s CSR form as they are, so nothing is
    materialised per entry and this code sorts nothing. (On CPU, PyTorch
    computes the product through ``G``'s transpose and converts it to
    latent-major order inside, a sort of the entries.)
    """
    dtype = torch.promote_types(sae_in.dtype, torch.float32)
    matrix = torch.sparse_csr_tensor(
        row_starts(token, sae_in.shape[0]),
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


def bagged_weight_grad(
    sae_in: torch.Tensor, token: torch.Tensor, latent: torch.Tensor, grad: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """``sae_in.T @ G`` as one ``embedding_bag`` over the entries sorted by latent (see :func:`encoder_weight_grad`).

    Column ``j`` of the gradient is the sum of the input rows of latent
    ``j``'s entries weighted by their gradients: one bag per latent. Costs a
    sort of the entries and a transposing copy of the result; on some CPUs
    several times faster than the CSR product when entries are many (the
    dead-latent loss's ``d_in / 2`` per token).
    """
    dtype = torch.promote_types(sae_in.dtype, torch.float32)
    order = torch.argsort(latent, stable=True)
    counts = torch.bincount(latent, minlength=d_sae)
    with torch.autocast(sae_in.device.type, enabled=False):
        per_latent = torch.nn.functional.embedding_bag(
            token[order],
            sae_in.to(dtype),
            counts.cumsum(0) - counts,
            mode="sum",
            per_sample_weights=grad.to(dtype)[order],
        )
    return per_latent.t().contiguous()


#: the ``W_enc`` gradient's implementations; the faster is measured per shape where it runs
ENCODER_WEIGHT_GRAD = MeasuredKernel(
    "encoder_weight_grad", {"csr": csr_weight_grad, "bagged": bagged_weight_grad}
)


def encoder_weight_grad(
    sae_in: torch.Tensor, token: torch.Tensor, latent: torch.Tensor, grad: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """``sae_in.T @ G`` with ``G [n_tokens, d_sae]`` holding ``grad`` at the (token-major) entries.

    The gradient of ``W_enc [d_in, d_sae]``, in its own layout, computed in at
    least float32 (sparse products have no bfloat16 kernel on CPU), by the
    faster of :func:`csr_weight_grad` and :func:`bagged_weight_grad` for this
    shape (``kernels.measured``): which is faster depends on the machine and
    on how many entries each token has (on one CPU at d_in 768, d_sae 16384,
    2048 tokens: the CSR product for ``k`` = 40 per token, 25 ms against 63,
    the bagged one for the dead-latent loss's 384, 117 ms against 301).
    """
    per_token = max(1, len(token) // max(1, sae_in.shape[0]))
    key = (
        tuple(sae_in.shape),
        d_sae,
        1 << (per_token - 1).bit_length(),
        sae_in.dtype,
        sae_in.device,
    )
    return ENCODER_WEIGHT_GRAD(key, sae_in, token, latent, grad, d_sae)


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
