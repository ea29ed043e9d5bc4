"""What a training step needs from the other replicas of a data-parallel SAE.

A Matryoshka training step has three pieces of batch-global state: the
BatchTopK selection (the ``k * n_tokens`` largest pre-activations of the whole
batch), the dead-latent mask (a latent is dead if it fired on no token) and the
inference threshold (the smallest kept activation); a ``b_dec`` started at the
first batch's geometric median needs sums over the batch. Under data
parallelism the batch is spread over ranks, so each becomes a collective
operation. The SAE is given one :class:`Collectives` object and calls these
operations without knowing how many processes there are: :data:`SINGLE_PROCESS` computes them
locally, ``distributed.DataParallelCollectives`` across ranks.
"""

from __future__ import annotations

import torch

from sae_lens_matryoshka.sparse_kernels import batch_topk_entries


class Collectives:
    """The batch-global operations of a training step, in a single process."""

    def batch_topk(self, hidden_pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(token, latent)`` entries BatchTopK keeps: the ``k * n_tokens`` largest positive ones.

        Returned token-major (tokens non-decreasing, latents increasing within a token).
        """
        return batch_topk_entries(hidden_pre, kept_entries(k, hidden_pre))

    def dead_everywhere(self, dead: torch.Tensor) -> torch.Tensor:
        """The dead-latent mask of the whole batch (``dead`` is this process's)."""
        return dead

    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        """The minimum of a scalar over the whole batch (``value`` is this process's)."""
        return value

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over the whole batch (``partial`` is this process's part of it)."""
        return partial


def kept_entries(k: float, hidden_pre: torch.Tensor, n_ranks: int = 1) -> int:
    """How many entries BatchTopK keeps of ``n_ranks`` batches like ``hidden_pre``: ``k * n_tokens``.

    Refuses a batch so small that BatchTopK would keep nothing and train nothing.
    """
    n_tokens = hidden_pre.shape[0] * n_ranks
    if k * n_tokens < 1:
        raise ValueError(
            f"BatchTopK keeps k * n_tokens = {k} * {n_tokens} = {k * n_tokens:g} < 1 latent "
            "activations of this batch, so it would train nothing: use a larger batch "
            "(train_batch_size_tokens) or a larger k."
        )
    return min(int(k * n_tokens), hidden_pre.numel() * n_ranks)


#: the collectives of an SAE trained in one process
SINGLE_PROCESS = Collectives()
