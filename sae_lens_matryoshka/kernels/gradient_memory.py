"""Memory for the weight matrices' gradients, kept from one step to the next on CPU.

A trainer drops every gradient after each step (``zero_grad`` sets them to
None, SAELens's trainer included), and glibc hands a block as large as a
weight matrix's gradient (48 MiB for ``W_enc`` at d_in 768, d_sae 16,384; its
limit for keeping freed blocks is 32 MiB) back to the operating system when
it is freed. The next step's gradient then faults every page in anew and
zero-fills it: on one 2-thread AMD EPYC about 20 ms per 48 MiB, 40 of a
0.7 s step for ``W_enc``'s and ``W_dec``'s gradients. The sparse backward
writes those gradients itself (``encoder_backward``, ``level_decode``), so it
can write them where the last step's were, once nothing holds that memory
any more; autograd then takes the tensor as the parameter's gradient without
a copy, as it takes any fresh one.

Nothing is shared that anyone still holds: the memory is handed out again
only when the tensor kept here is its storage's sole user (no ``.grad``, no
reference a caller kept, no view of it). A gradient accumulated over several
backward passes, or one whose tensor the caller keeps, gets fresh memory.
At most :data:`KEPT_PER_WEIGHT` blocks are kept per weight (one step's
backward may make two gradients of one weight: the reconstruction's and the
dead-latent loss's, which autograd sums), and they go with the weight: while
it lives, so does up to twice its size in kept memory (one gradient's worth
is what ``zero_grad(set_to_none=False)`` keeps).

On a GPU nothing is kept: the caching allocator already reuses freed blocks
without a fault, and kept gradients would raise the forward pass's peak
memory by their size, which matters at the dictionary sizes GPUs train.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

#: the most blocks kept per weight: one step's gradients of it (the reconstruction
#: loss's and the dead-latent loss's); more held at once get memory of their own
KEPT_PER_WEIGHT = 2

_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _users(tensor: torch.Tensor) -> int:
    """How many references ``tensor``'s storage has (tensors, views, storage objects)."""
    storage = tensor.untyped_storage()  # held while counted: the count includes it
    return int(torch._C._storage_Use_Count(storage._cdata))


def _only_user(kept: torch.Tensor) -> bool:
    """Whether nothing but ``kept`` uses its storage."""
    # a tensor of its own gives the count that means "nobody else", however many
    # references torch's storage objects take themselves
    return _users(kept) <= _users(torch.empty(1))


def empty_gradient(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised memory for ``weight``'s gradient in ``dtype``: on CPU, a block an earlier step's gradient used.

    Contiguous, ``weight``'s shape, on its device. A block kept for
    ``weight`` when nothing else uses it, else a new one, kept in place of
    the oldest where :data:`KEPT_PER_WEIGHT` are. Only where the gradient has ``weight``'s
    dtype (which autograd then takes as it is) and lives on CPU; elsewhere
    always new memory.
    """
    if weight.device.type != "cpu" or dtype != weight.dtype:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    kept: list[torch.Tensor] = _KEPT.setdefault(weight, [])
    kept[:] = [block for block in kept if block.shape == weight.shape and block.dtype == dtype]
    for block in kept:
        if _only_user(block):
            return block.detach()  # a tensor of its own, which autograd may take as it is
    block = torch.empty(weight.shape, dtype=dtype)
    kept[:] = [*kept[len(kept) - KEPT_PER_WEIGHT + 1 :], block]
    return block.detach()
