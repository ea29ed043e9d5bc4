"""What a training step's encoder hands on: one value, dense or sparse, with the same methods.

A training step encodes its batch once. From that one encoding it decodes
every Matryoshka level, computes the dead-latent auxiliary loss, hands SAELens's
trainer the activations for its firing statistics, and lets the activation
learn from the kept values. The dense path (:class:`DenseEncoding`) holds the
activations as an ``n_tokens x d_sae`` matrix with autograd; the sparse path
(:class:`SparseEncoding`) holds only the active entries, token-major, with the
dense pre-activations kept without a graph for selections. Both offer the
methods of :class:`Encoding`, so the step never asks which one it has.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from sae_lens_matryoshka.collectives import Collectives
from sae_lens_matryoshka.decoder import FreeDecoder, RawValues
from sae_lens_matryoshka.kernels.encoder_backward import (
    EncoderEntries,
    EntryOrder,
    LaterEncoderValues,
    SparseEncoderValues,
)
from sae_lens_matryoshka.kernels.entry_sets import EntrySets
from sae_lens_matryoshka.kernels.level_decode import (
    DecodeEntries,
    RunningLevels,
    decode_groups,
    decode_levels,
)
from sae_lens_matryoshka.kernels.selection import DeadLatentPick
from sae_lens_matryoshka.levels import LevelPlan


class Encoding(Protocol):
    """A batch's encoding, as the rest of a training step uses it."""

    @property
    def hidden_pre(self) -> torch.Tensor:
        """Pre-activations ``[*batch, d_sae]`` in activation units (for ``TrainStepOutput``)."""
        ...

    @property
    def feature_acts(self) -> torch.Tensor:
        """Activations ``[*batch, d_sae]`` for SAELens's statistics: dense, or sparse COO."""
        ...

    def kept_values(self) -> torch.Tensor:
        """The values of the active latents (no graph), in no particular order."""
        ...

    def decode_levels(
        self, W_dec: torch.Tensor, b_dec: torch.Tensor, plan: LevelPlan, detach: bool
    ) -> torch.Tensor:
        """Every level's reconstruction, ``[n_levels, *batch, d_in]`` (before output normalisation).

        With ``detach``, level ``l`` adds its group to a detached level ``l - 1``.
        """
        ...

    def dead_latent_reconstruction(
        self,
        dead: DeadLatentPick,
        n_pick: int,
        W_dec: torch.Tensor,
        rectified: bool,
        collectives: Collectives,
    ) -> torch.Tensor:
        """Each token's decode (no bias) of its ``n_pick`` most active dead latents, ``[*batch, d_in]``.

        ``dead`` picks this process's dead latents (in its numbering), the
        cheaper way for how many are dead; ``collectives`` ranks them with the
        other shards' (``n_pick`` counts the whole dictionary's). ``rectified``:
        their pre-activations go through a ReLU first (else they decode with
        their sign). Both paths decode the picks sparsely (one
        ``embedding_bag``), never an ``n_tokens x n_dead`` matrix.
        """
        ...


class DenseEncoding(NamedTuple):
    """The dense path's encoding: every activation, with autograd through dense matmuls."""

    hidden_pre: torch.Tensor
    acts: torch.Tensor
    #: ``||W_dec_j||``, with graph
    decoder_norms: torch.Tensor
    #: the SAE's decoder: in what units ``acts`` multiply its rows
    decoder: FreeDecoder

    @property
    def feature_acts(self) -> torch.Tensor:
        return self.acts

    def kept_values(self) -> torch.Tensor:
        acts = self.acts.detach()
        return acts[acts > 0]

    def decoding_acts(self, acts: torch.Tensor, latents: slice | torch.Tensor) -> torch.Tensor:
        """``acts`` of ``latents`` (columns, or each entry's latent) as they multiply their rows."""
        return self.decoder.decoding_acts(acts, lambda: self.decoder_norms[latents])

    def decode_levels(
        self, W_dec: torch.Tensor, b_dec: torch.Tensor, plan: LevelPlan, detach: bool
    ) -> torch.Tensor:
        acts = self.decoding_acts(self.acts, slice(None))
        return decode_levels(acts, W_dec, b_dec, plan.widths, detach)

    def dead_latent_reconstruction(
        self,
        dead: DeadLatentPick,
        n_pick: int,
        W_dec: torch.Tensor,
        rectified: bool,
        collectives: Collectives,
    ) -> torch.Tensor:
        flat = self.hidden_pre.reshape(-1, self.hidden_pre.shape[-1])
        token, latent, _ = collectives.dead_topk(*dead.top(flat.detach(), n_pick), n_pick)
        values = flat[token, latent]  # gathered again: the dense path differentiates through it
        values = values.relu() if rectified else values
        acts = self.decoding_acts(values, latent)
        one_group = latent.new_zeros(0)
        recon = decode_groups(acts, token, latent, W_dec, flat.shape[0], one_group)[:, 0]
        return recon.view(*self.hidden_pre.shape[:-1], -1)


class PreActivations(NamedTuple):
    """The sparse path's dense encoder output, and what differentiates any entry of it.

    With activations measured in unit-norm decoder units, an active entry's
    activation ``a = h * ||W_dec_j||`` multiplies the decoder row
    ``W_dec_j / ||W_dec_j||``, so what it adds to the reconstruction is
    ``h * W_dec_j``: the norms cancel out of every gradient of a k-sparse step
    (the dense path computes two terms that cancel). The sparse path therefore
    decodes with the raw pre-activations ``h`` and keeps the norms out of the graph.
    """

    #: ``[n_tokens, d_sae]`` in activation units, computed without a graph
    hidden_pre: torch.Tensor
    #: ``[n_tokens, d_in]``, the processed input, without a graph
    sae_in: torch.Tensor
    #: ``b_dec`` when it is subtracted from the input (its gradient comes from here)
    shift: torch.Tensor | None
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    #: the values of entries of ``hidden_pre`` (and their latents) -> the raw pre-activations
    #: ``h`` (divided by the no-graph norms when activations are in unit-norm decoder units)
    raw_values: RawValues
    #: the leading dimensions of the step's input (``[n_tokens]`` flattens them)
    batch_shape: torch.Size
    #: the sets of entries differentiated through ``W_enc``: the first, then the
    #: dead-latent loss's, whose gradients the first one's backward sums (``kernels.entry_sets``)
    entry_sets: EntrySets[EncoderEntries]

    def decoding_values(
        self,
        token: torch.Tensor,
        latent: torch.Tensor,
        order: EntryOrder | None = None,
        at_entries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The raw pre-activations ``h`` at the entries: what multiplies ``W_dec`` rows, with a graph.

        ``order``: the entries' latent-major order, shared with their decode's
        backward. ``at_entries``: ``hidden_pre`` at the entries where the caller
        has already read it (the dead-latent pick ranks them), else read here.
        """
        if at_entries is None:
            at_entries = self.hidden_pre[token, latent]
        with torch.no_grad():
            values = self.raw_values(at_entries, latent)
        sets = self.entry_sets
        attached: torch.Tensor
        if sets.link is not None:
            attached = LaterEncoderValues.apply(values, sets.link, token, latent, order, sets.later)
            return attached
        attached, link = SparseEncoderValues.apply(
            values,
            self.sae_in,
            self.shift,
            self.W_enc,
            self.b_enc,
            token,
            latent,
            order,
            sets.later,
        )
        if link.requires_grad:  # a first set with a graph: later sets join it
            sets.link = link
        return attached

    def entry_order(self, latent: torch.Tensor) -> EntryOrder:
        """The latent-major order of entries with these latents, sorted once when first needed."""
        return EntryOrder(latent, self.hidden_pre.shape[-1])


class SparseEncoding(NamedTuple):
    """The sparse path's encoding: the active entries, token-major, and their values."""

    pre: PreActivations
    token: torch.Tensor
    latent: torch.Tensor
    #: what multiplies the entries' decoder rows (ReLU of their raw pre-activations), with a graph
    decoding_values: torch.Tensor
    #: the entries' activations as a sparse COO tensor (no graph), for SAELens's statistics
    feature_acts: torch.Tensor
    #: the entries' latent-major order, which the encoder's and the decode's backward share
    order: EntryOrder
    #: the sets of entries decoded through ``W_dec``: these, then the dead-latent loss's,
    #: whose ``W_dec`` gradients the first decode's backward computes (``kernels.entry_sets``)
    decode_sets: EntrySets[DecodeEntries]

    @classmethod
    def of_entries(
        cls, pre: PreActivations, token: torch.Tensor, latent: torch.Tensor
    ) -> SparseEncoding:
        """The encoding of the entries ``(token, latent)`` an activation kept."""
        order = pre.entry_order(latent)
        at_entries = pre.hidden_pre[token, latent]
        decoding_values = pre.decoding_values(token, latent, order, at_entries).relu()
        batch_shape = pre.batch_shape
        rows = torch.unravel_index(token, batch_shape) if len(batch_shape) > 1 else (token,)
        feature_acts = torch.sparse_coo_tensor(
            torch.stack([*rows, latent]),
            at_entries.relu(),
            (*batch_shape, pre.hidden_pre.shape[-1]),
            is_coalesced=True,  # token-major: already in coalesced order, each entry once
            check_invariants=False,
        )
        return cls(pre, token, latent, decoding_values, feature_acts, order, EntrySets())

    @property
    def hidden_pre(self) -> torch.Tensor:
        return self.pre.hidden_pre.view(*self.pre.batch_shape, -1)

    def kept_values(self) -> torch.Tensor:
        return self.feature_acts.values()

    def decode_levels(
        self, W_dec: torch.Tensor, b_dec: torch.Tensor, plan: LevelPlan, detach: bool
    ) -> torch.Tensor:
        n_tokens = self.pre.sae_in.shape[0]
        partials = decode_groups(
            self.decoding_values,
            self.token,
            self.latent,
            W_dec,
            n_tokens,
            plan.bounds,
            self.order,
            self.decode_sets,
        )
        reconstructions = RunningLevels.apply(partials, b_dec, detach)
        return reconstructions.unflatten(1, self.pre.batch_shape)

    def dead_latent_reconstruction(
        self,
        dead: DeadLatentPick,
        n_pick: int,
        W_dec: torch.Tensor,
        rectified: bool,
        collectives: Collectives,
    ) -> torch.Tensor:
        token, latent, picked = collectives.dead_topk(
            *dead.top(self.pre.hidden_pre, n_pick), n_pick
        )
        order = self.pre.entry_order(latent)
        values = self.pre.decoding_values(token, latent, order, picked)
        if rectified:
            values = values.relu()
        n_tokens = self.pre.sae_in.shape[0]
        one_group = latent.new_zeros(0)
        sets = self.decode_sets
        recon = decode_groups(values, token, latent, W_dec, n_tokens, one_group, order, sets)
        return recon[:, 0].unflatten(0, self.pre.batch_shape)


def dense_only(encoding: Encoding) -> DenseEncoding:
    """``encoding`` as the dense encoding a penalised (not k-sparse) activation trains with."""
    if not isinstance(encoding, DenseEncoding):
        raise TypeError(
            "this activation is not k-sparse: it trains on the dense path only "
            f"(got a {type(encoding).__name__})."
        )
    return encoding
