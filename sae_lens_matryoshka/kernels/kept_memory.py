"""Memory for a training step's largest tensors, kept from one step to the next on CPU.

A trainer drops every gradient after each step (``zero_grad`` sets them to
None, SAELens's trainer included) and the step's pre-activations with its
output, and glibc hands a block this large (48 MiB for ``W_enc``'s gradient
at d_in 768, d_sae 16,384; 128 MiB for the pre-activations of 2048 tokens;
its limit for keeping freed blocks is 32 MiB) back to the operating system
when it is freed. The next step then faults every page in anew and
zero-fills it: on one 2-thread AMD EPYC about 20 ms per 48 MiB, 40 of a
0.7 s step for ``W_enc``'s and ``W_dec``'s gradients, and the encoder's
matmul took 483 ms into fresh memory against 420 into kept memory. The
sparse path writes these tensors itself (the gradients in
``encoder_backward`` and ``level_decode``, the pre-activations in the
step's encoder matmul, :func:`pre_activations`, and scratch tensors such as
the selection's flags, :func:`empty_scratch`), so it can write them where
an earlier step's were, once nothing holds that memory any more; autograd
then takes a gradient as the parameter's without a copy, as it takes any
fresh one.

Nothing is shared that anyone still holds: the memory is handed out again
only when the tensor kept here is its storage's sole user (no ``.grad``, no
step output a caller still holds, no other reference, no view of it). A
gradient accumulated over several backward passes, or a tensor the caller
keeps, gets fresh memory. At most :data:`KEPT_PER_USE` blocks are kept per
weight and use: a training loop may hold the last step's output (its
pre-activations included) or gradient while the next step runs (SAELens's
trainer holds the output; for it ``kept_outputs`` drops the pre-activations
after the step, and one block serves every step, as it does for each
gradient, the dead-latent loss's entries included, ``kernels.entry_sets``),
and a second block is made only then. They go with the weight: while it
lives, so does up to twice the size of each in kept memory.

On a GPU nothing is kept: the caching allocator already reuses freed blocks
without a fault, and kept blocks would raise the step's peak memory by their
size, which matters at the dictionary sizes GPUs train.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

#: the most blocks kept per weight and use: this step's, and the last step's while a
#: loop still holds it; more held at once get memory of their own
KEPT_PER_USE = 2

#: weight (or :data:`_SCRATCH`) -> use ("gradient", "pre-activations", ...) -> the blocks kept for it
_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()


class _Scratch:
    """The owner of the memory no weight owns: a step's scratch tensors, kept for the process's life."""


_SCRATCH = _Scratch()


def _users(tensor: torch.Tensor) -> int:
    """How many references ``tensor``'s storage has (tensors, views, storage objects)."""
    storage = tensor.untyped_storage()  # held while counted: the count includes it
    return int(torch._C._storage_Use_Count(storage._cdata))


def _only_user(kept: torch.Tensor) -> bool:
    """Whether nothing but ``kept`` uses its storage."""
    # a tensor of its own gives the count that means "nobody else", however many
    # references torch's storage objects take themselves
    return _users(kept) <= _users(torch.empty(1))


def _kept_empty(
    owner: torch.Tensor | _Scratch, use: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Uninitialised CPU memory of ``shape`` and ``dtype``: a block kept for ``owner``'s ``use`` that nothing else uses, else a new one.

    A new block is kept in place of the oldest where :data:`KEPT_PER_USE` are.
    """
    kept: list[torch.Tensor] = _KEPT.setdefault(owner, {}).setdefault(use, [])
    kept[:] = [block for block in kept if block.shape == shape and block.dtype == dtype]
    for block in kept:
        if _only_user(block):
            return block.detach()  # a tensor of its own, which autograd may take as it is
    block = torch.empty(shape, dtype=dtype)
    kept[:] = [*kept[len(kept) - KEPT_PER_USE + 1 :], block]
    return block.detach()


def empty_scratch(
    use: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Uninitialised memory for a scratch tensor a kernel makes and drops within a step: on CPU, an earlier step's.

    Such as the BatchTopK selection's flag per pre-activation (32 MiB at the
    CPU default size, half of whose 33 ms went to faulting it in). Kept for
    the process's life, at most :data:`KEPT_PER_USE` blocks per ``use``, of
    the last shape asked for; elsewhere than on CPU always new memory.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return _kept_empty(_SCRATCH, use, shape, dtype)


def empty_gradient(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised memory for ``weight``'s gradient in ``dtype``: on CPU, a block an earlier step's gradient used.

    Contiguous, ``weight``'s shape, on its device. Kept only where the
    gradient has ``weight``'s dtype (which autograd then takes as it is) and
    lives on CPU; elsewhere always new memory.
    """
    if weight.device.type != "cpu" or dtype != weight.dtype:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return _kept_empty(weight, "gradient", tuple(weight.shape), dtype)


def pre_activations(b_enc: torch.Tensor, sae_in: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """``sae_in @ W_enc + b_enc`` without a graph: on CPU in the memory an earlier step's used.

    ``sae_in`` is ``[n_tokens, d_in]``. Written over a kept block only where
    torch's own ``addmm`` would give the same tensor there: on CPU, without
    a graph, outside autocast. Elsewhere (a GPU, a bfloat16 forward under
    autocast) it is that ``addmm``.
    """
    plain = (
        W_enc.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
    )
    if plain:
        return torch.addmm(b_enc, sae_in, W_enc)
    shape = (sae_in.shape[0], W_enc.shape[1])
    out = _kept_empty(W_enc, "pre-activations", shape, W_enc.dtype)
    return torch.addmm(b_enc, sae_in, W_enc, out=out)
