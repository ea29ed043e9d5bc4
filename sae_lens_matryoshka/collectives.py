"""What a training step needs from the other ranks of a distributed SAE, and the one-process answer.

A Matryoshka training step has batch-global state: the BatchTopK selection
(the ``k * n_tokens`` largest pre-activations of the whole batch), the
dead-latent mask (a latent is dead if it fired on no token), the inference
threshold (the smallest kept activation), and sums over the batch (a
geometric-median ``b_dec``). When the dictionary itself is split over ranks
(latent sharding), it also needs the whole dictionary's view of each token:
TopK and the dead-latent selection rank every shard's latents, and the
reconstruction is the sum of every shard's part.

The SAE is given one :class:`Collectives` object and calls these operations
without knowing how many processes there are: :data:`SINGLE_PROCESS` computes
them locally, ``mesh.MeshCollectives`` over a grid of data-parallel replicas x
latent shards. Which of the dictionary's latents a process holds is its SAE's
(``latent_part.LatentPart``), not a property of these operations.
"""

from __future__ import annotations

import torch

from sae_lens_matryoshka.kernels.selection import (
    Selection,
    batch_topk_entries,
    batch_topk_selection,
    topk_entries,
)


class Collectives:
    """The batch-global operations of a training step, in a single process with every latent."""

    def batch_topk(self, hidden_pre: torch.Tensor, k: float, count_on_host: bool) -> Selection:
        """The ``(token, latent)`` entries BatchTopK keeps: the ``k * n_tokens`` largest positive ones.

        Returned token-major (tokens non-decreasing, latents increasing within a
        token). Without ``count_on_host`` nothing is read back to the host and
        the selection may come back ``missed`` (see ``Selection``): a training
        step reads that with its other numbers and then selects again with it.
        That selection is the faster of two for this shape on this machine
        (``kernels.selection.batch_topk_selection``).
        """
        n_keep = kept_entries(k, hidden_pre.shape[0], hidden_pre.numel())
        if count_on_host:
            return batch_topk_entries(hidden_pre, n_keep)
        return batch_topk_selection(hidden_pre, n_keep)

    def topk(self, hidden_pre: torch.Tensor, k: int) -> Selection:
        """The ``(token, latent)`` entries TopK keeps: each token's ``k`` largest, token-major."""
        return Selection(*topk_entries(hidden_pre, k))

    def dead_topk(
        self, values: torch.Tensor, latents: torch.Tensor, n_pick: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dead latents the auxiliary loss decodes: each token's ``n_pick`` most active.

        ``values`` and ``latents`` ``[n_tokens, m]`` are this process's
        candidates, its own ``m <= n_pick`` most active dead latents per token
        (``kernels.selection.DeadLatentPick``); returned are ``(token, latent,
        value)`` of those among the whole dictionary's ``n_pick`` largest,
        token-major: the values come along, so that the pre-activations are
        not read again at the picked entries. One process holds the whole
        dictionary: its candidates are the answer.
        """
        del n_pick  # they are already each token's n_pick largest of the whole dictionary
        token = torch.arange(values.shape[0], device=values.device)
        return token.repeat_interleave(values.shape[-1]), latents.reshape(-1), values.reshape(-1)

    def dead_everywhere(self, dead: torch.Tensor) -> torch.Tensor:
        """The dead-latent mask of the whole batch (``dead`` is this process's)."""
        return dead

    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        """The minimum of a scalar over the whole batch (``value`` is this process's)."""
        return value

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over the whole batch (``partial`` is this process's part of it)."""
        return partial

    def mean(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch's mean of ``rows [n, d]`` (this process's) and its number of rows.

        One :meth:`sum` of the rows' sum and count together.
        """
        count = rows.new_full((1,), rows.shape[0])  # made on the device, not copied to it
        totals = self.sum(torch.cat([rows.sum(dim=0), count]))
        return totals[:-1] / totals[-1], totals[-1]

    def decoder_bias(self, b_dec: torch.Tensor) -> torch.Tensor:
        """What this process adds as ``b_dec`` to its part of the reconstruction."""
        return b_dec

    def whole_reconstruction(self, part: torch.Tensor) -> torch.Tensor:
        """A reconstruction by the whole dictionary, from this process's latents' ``part`` of it."""
        return part

    def whole_feature_acts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """The activations of the whole dictionary (no graph), from this process's latents'."""
        return feature_acts


def kept_entries(k: float, n_tokens: int, n_entries: int) -> int:
    """How many entries BatchTopK keeps of a batch of ``n_tokens`` (``n_entries`` in all): ``k * n_tokens``.

    Refuses a batch so small that BatchTopK would keep nothing and train nothing.
    """
    if k * n_tokens < 1:
        raise ValueError(
            f"BatchTopK keeps k * n_tokens = {k} * {n_tokens} = {k * n_tokens:g} < 1 latent "
            "activations of this batch, so it would train nothing: use a larger batch "
            "(train_batch_size_tokens) or a larger k."
        )
    return min(int(k * n_tokens), n_entries)


#: the collectives of an SAE trained in one process
SINGLE_PROCESS = Collectives()
