"""Which ``(token, latent)`` entries a top-k keeps, token-major, without a host read where it can.

:func:`batch_topk_entries` and :func:`topk_entries` return the entries a dense
top-k would keep; :func:`topk` is the dense TopK activation itself.
:func:`batch_topk_selection` is BatchTopK's selection in a training step,
which reads nothing back to the host (a flag on the device says when the
step must select again with :func:`batch_topk_entries`). It is a measured
kernel (``kernels.measured``) of two candidates that keep the same entries:
:func:`sampled_batch_topk_entries` ranks only the entries above a threshold
estimated from a sample, :func:`topk_batch_topk_entries` ranks all
``n_tokens x d_sae`` of them with one ``topk``. Which is faster depends on
the machine: on a CPU ``topk`` is a partial sort of the whole matrix, slower
than the sampled selection's few passes over it; on a GPU it is a radix
select, a few passes too, against the sampled selection's count, compaction
and ranking kernels. So each machine times both, once per shape. (The
sharded step keeps the exact :func:`batch_topk_entries`: its ranks agree on
a cut-off by reading counts back anyway, so reading nothing gains it nothing.)
:func:`dead_latent_pick` chooses how the dead-latent aux loss picks each
token's most active dead latents (the top-k over the pre-activations with the
live latents masked out): by gathering the dead latents' columns when few are
dead, by ranking every column in place when nearly all are.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from sae_lens_matryoshka.kernels.encoder_backward import narrowest_int_dtype
from sae_lens_matryoshka.kernels.kept_memory import empty_scratch
from sae_lens_matryoshka.kernels.measured import MeasuredKernel
from sae_lens_matryoshka.kernels.threads import single_thread

#: the largest and smallest samples for estimating the selection threshold (at
#: most 1/16 of the values); the result is exact whatever the sample, a better
#: estimate only means fewer candidates to rank
_THRESHOLD_SAMPLE = 1 << 16
_SMALLEST_SAMPLE = 1 << 10
#: the threshold aims for this many times the entries to keep, so that it
#: almost never falls above the true cut-off (the exact fallback then runs)
_CANDIDATE_MARGIN = 2.0
_SAMPLER_SEED = 0x5EED
#: the host-read-free selection collects up to this many times the candidates the
#: threshold aims for (:func:`sampled_batch_topk_entries`): the sample's count above
#: the threshold varies by a few percent, so more than this is a threshold far off
_CANDIDATE_ROOM = 2.0


@functools.lru_cache(maxsize=8)
def _sample_positions(numel: int, size: int, device: torch.device) -> torch.Tensor:
    """Fixed random positions to sample (a private generator leaves the global RNG alone)."""
    generator = torch.Generator(device=device).manual_seed(_SAMPLER_SEED)
    return torch.randint(0, numel, (size,), generator=generator, device=device)


def _threshold_sample(numel: int, n_keep: int) -> tuple[int, int] | None:
    """How large a sample the threshold is estimated from, and how many of it lie above it.

    None where sampling cannot help (a small matrix, or most entries kept).
    """
    size = min(_THRESHOLD_SAMPLE, numel // 16)
    above = math.ceil(_CANDIDATE_MARGIN * n_keep / numel * size) + 16
    if size < _SMALLEST_SAMPLE or above >= size:
        return None
    return size, above


def _candidate_threshold(flat: torch.Tensor, n_keep: int) -> torch.Tensor | float:
    """A value that, with high probability, at least ``n_keep`` entries of ``flat`` exceed.

    Stays on the device (no host synchronisation); 0 where sampling cannot help.
    """
    sample_plan = _threshold_sample(flat.numel(), n_keep)
    if sample_plan is None:
        return 0.0
    size, above = sample_plan
    sample = flat.index_select(0, _sample_positions(flat.numel(), size, flat.device))
    return sample.kthvalue(size - above).values.clamp(min=0.0)


def _candidate_room(numel: int, n_keep: int) -> int:
    """The candidate buffer's size: ``_CANDIDATE_ROOM`` times what the threshold aims to pass.

    Every entry where no sample is drawn (every positive one is a candidate then).
    """
    sample_plan = _threshold_sample(numel, n_keep)
    if sample_plan is None:
        return numel
    size, above = sample_plan
    return min(numel, math.ceil(_CANDIDATE_ROOM * above * numel / size))


class Selection(NamedTuple):
    """The ``(token, latent)`` entries an activation keeps, token-major, and whether they are sure.

    A selection whose shapes were fixed without reading a count back to the
    host (:func:`batch_topk_selection`) carries ``missed``: a 0-d bool
    on the device, true where its estimate fell outside what it can answer
    exactly. The training step reads it with its other numbers in one host
    read and, where true, selects again with :func:`batch_topk_entries`.
    """

    token: torch.Tensor
    latent: torch.Tensor
    #: None where the entries are exact by construction
    missed: torch.Tensor | None = None


def batch_topk_entries(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
    """The ``n_keep`` largest positive entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    The same entries as a dense ``topk`` over the flattened matrix (ties at
    the cut-off are broken by position, where a dense top-k breaks them
    arbitrarily); fewer when fewer are positive. Instead of ranking all
    ``n_tokens * d_sae`` values, entries above a threshold estimated from a
    sample are ranked; when fewer than ``n_keep`` pass it, every positive entry
    is ranked instead, so the result never depends on the estimate. Reads how
    many entries pass back to the host (a synchronisation);
    :func:`sampled_batch_topk_entries` does not.
    """
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    if n_keep <= 0:
        nothing = torch.zeros(0, dtype=torch.long, device=flat.device)
        return Selection(nothing, nothing)
    candidates = (flat > _candidate_threshold(flat, n_keep)).nonzero().squeeze(1)
    if candidates.numel() < n_keep:
        candidates = (flat > 0).nonzero().squeeze(1)
    if candidates.numel() > n_keep:
        candidates = candidates[_first_largest(flat.index_select(0, candidates), n_keep)]
    return Selection(candidates // d_sae, candidates % d_sae)


def _first_largest(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Positions of ``values``' ``n_keep`` largest, increasing (ties broken by position).

    Every value above the ``n_keep``-th largest (the cut-off), then the first
    of those equal to it, as many as there is room for: exactly ``n_keep``, a
    static size, so no synchronisation. (The first ``n_keep`` values at or
    above the cut-off would drop larger values that come after a run of
    ties: bfloat16 pre-activations tie at the cut-off in most batches.)
    """
    cutoff = values.kthvalue(values.numel() - n_keep + 1).values
    above = values > cutoff
    tied = values == cutoff
    room_for_tied = n_keep - above.count_nonzero()
    counts = narrowest_int_dtype(values.numel() + 1)  # a count of up to every value
    keep = above | (tied & (tied.cumsum(0, dtype=counts) <= room_for_tied))
    return torch.nonzero_static(keep, size=n_keep).squeeze(1)


def sampled_batch_topk_entries(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
    """:func:`batch_topk_entries` without a host read, and a flag for the rare batch it cannot do.

    The entries above the sampled threshold are collected into a buffer of
    fixed size (``_CANDIDATE_ROOM`` times the expected number) and ranked
    there. Exact whenever between ``n_keep`` and the buffer's size pass the
    threshold; ``missed`` says, on the device, when not (fewer than ``n_keep``
    positive entries, or an estimate far off), and the caller then selects
    with :func:`batch_topk_entries`.
    """
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    if n_keep <= 0:
        return batch_topk_entries(hidden_pre, n_keep)  # nothing to select: no read either
    room = _candidate_room(flat.numel(), n_keep)
    # one flag per value, in memory an earlier step's flags used (on CPU)
    flags = empty_scratch("selection flags", (flat.numel(),), torch.bool, flat.device)
    passing = torch.gt(flat, _candidate_threshold(flat, n_keep), out=flags)
    n_passing = passing.count_nonzero()  # a sum would convert every flag to int64 first
    # the buffer's unused end repeats the last entry, so that every index stays
    # valid and increasing whatever the count (a missed selection is still decoded)
    candidates = torch.nonzero_static(passing, size=room, fill_value=flat.numel() - 1).squeeze(1)
    if room > n_keep:
        used = torch.arange(room, device=flat.device) < n_passing
        values = torch.where(used, flat.index_select(0, candidates), -torch.inf)
        candidates = candidates[_first_largest(values, n_keep)]
    missed = (n_passing < n_keep) | (n_passing > room)
    return Selection(candidates // d_sae, candidates % d_sae, missed)


def topk_batch_topk_entries(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
    """:func:`sampled_batch_topk_entries` by a ``topk`` over every entry: no estimate to miss.

    The ``n_keep`` largest of the flattened pre-activations, their positions
    sorted (token-major). Ranks all ``n_tokens * d_sae`` values, which costs
    more than ranking the sampled candidates where ``topk``'s selection is
    slow (a CPU: a partial sort over the whole matrix) and may cost less
    where it is a few passes of a radix select (a GPU), so
    :func:`batch_topk_selection` times both. ``missed`` (on the device) is
    true where its smallest kept value is not positive: fewer than ``n_keep``
    entries are, so the answer's size depends on the data and the caller
    selects again with :func:`batch_topk_entries`, as after a sampled miss.
    """
    d_sae = hidden_pre.shape[-1]
    flat = hidden_pre.reshape(-1)
    if n_keep <= 0:
        return batch_topk_entries(hidden_pre, n_keep)  # nothing to select: no read either
    top = flat.topk(n_keep, sorted=False)
    # narrowed and on one thread on CPU, as latent_major_order sorts (torch's parallel
    # radix sort stalls on shared cores, one pass per byte of the key's type)
    narrow = narrowest_int_dtype(flat.numel())
    with single_thread() if flat.device.type == "cpu" else contextlib.nullcontext():
        positions = top.indices.to(narrow).sort().values.long()
    missed = top.values.min() <= 0
    return Selection(positions // d_sae, positions % d_sae, missed)


#: BatchTopK's host-read-free selection: the faster is measured per shape where it runs
BATCH_TOPK_SELECTION: MeasuredKernel[Selection] = MeasuredKernel(
    "batch_topk_selection",
    {"sampled": sampled_batch_topk_entries, "topk": topk_batch_topk_entries},
)


def batch_topk_selection(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
    """:func:`batch_topk_entries` without a host read: ``missed`` says where to select again.

    By the faster of :func:`sampled_batch_topk_entries` and
    :func:`topk_batch_topk_entries` for this shape (``kernels.measured``): the
    same entries (ties at the cut-off aside), the same ``missed`` where fewer
    than ``n_keep`` entries are positive, at costs that differ by machine (on
    one 2-core CPU at 2048 tokens x 16,384 latents in float32, ``n_keep`` =
    40 per token: the sampled selection in 94 ms, the ``topk`` in 572).
    The first call for a shape runs each a few times to time them.
    """
    key = (tuple(hidden_pre.shape), n_keep, hidden_pre.dtype, hidden_pre.device)
    return BATCH_TOPK_SELECTION(key, hidden_pre, n_keep)


def topk_entries(hidden_pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

    Exactly ``k`` per token, whatever their sign, so the shapes are static (no
    host synchronisation); TopK's ReLU zeroes the non-positive ones afterwards.
    """
    latent = hidden_pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    token = torch.arange(hidden_pre.shape[0], device=hidden_pre.device).repeat_interleave(k)
    return token, latent.reshape(-1)


def topk(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each token's ``k`` largest pre-activations (then ReLU)."""
    top = hidden_pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())


#: the most elements one block of tokens of a dead-latent pick holds (the gathered
#: columns, or the ranked candidates): 16 MiB in float32, however many latents are dead.
#: Under glibc's 32 MiB limit for keeping freed memory, each block reuses the last one's
#: instead of faulting in fresh pages: on one 2-thread AMD EPYC (2048 tokens, 8,192 dead
#: latents) the pick took 110 ms in 16 MiB blocks against 152 in one of 64 MiB
_DEAD_BLOCK_ELEMENTS = 1 << 22
#: the fraction of a range's latents dead from which :func:`dead_latent_pick` ranks every
#: column in place (:class:`MaskedDeadLatents`) instead of gathering the dead ones
#: (:class:`GatheredDeadLatents`): measured on CPU at d_sae 16k to 262k, the gather is
#: faster up to 90% dead (4x at 50%: it ranks half the columns), the in-place ranking from
#: 95-98% on (by up to a third: it copies nothing)
MASKED_PICK_FROM = 0.96


class DeadLatentPick(Protocol):
    """How a step picks each token's most active dead latents of one range of the dictionary.

    Chosen per step by :func:`dead_latent_pick` from how many of the range's
    latents are dead, which the step already knows; both give the same picks
    (up to ties), at different costs.
    """

    def top(self, hidden_pre: torch.Tensor, n_pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's ``n_pick`` largest dead pre-activations: ``(values, latents)``, ``[n_tokens, m]``.

        ``hidden_pre [n_tokens, d]``, read without a graph. ``m`` is ``n_pick``
        in one process; a shard holding fewer of the range's dead latents
        returns fewer, or pads with ``-inf`` values (at live latents).
        """
        ...

    def within(self, start: int, stop: int) -> DeadLatentPick:
        """The same pick restricted to latents ``[start, stop)``, numbered from ``start``."""
        ...


def _by_blocks(
    hidden_pre: torch.Tensor,
    n_out: int,
    held_per_token: int,
    block_top: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_top`` over blocks of tokens that hold at most ``_DEAD_BLOCK_ELEMENTS`` at once.

    ``block_top`` maps a block of rows to its ``[rows, n_out]`` values and
    latents, holding ``held_per_token`` elements per token meanwhile: with
    many dead latents, a gather over the whole batch would copy most of the
    pre-activations (1 GiB at d_sae 65k, 4096 tokens).
    """
    n_tokens = hidden_pre.shape[0]
    rows = max(1, _DEAD_BLOCK_ELEMENTS // max(held_per_token, 1))
    if rows >= n_tokens:
        return block_top(hidden_pre)
    values = hidden_pre.new_empty(n_tokens, n_out)
    latents = torch.empty(n_tokens, n_out, dtype=torch.long, device=hidden_pre.device)
    for first in range(0, n_tokens, rows):
        values[first : first + rows], latents[first : first + rows] = block_top(
            hidden_pre[first : first + rows]
        )
    return values, latents


class GatheredDeadLatents(NamedTuple):
    """The pick that ranks only the dead latents' columns, gathered: cheap when few are dead."""

    #: the dead latents, increasing
    latents: torch.Tensor

    def top(self, hidden_pre: torch.Tensor, n_pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_dead = self.latents.numel()
        n_out = min(n_pick, n_dead)

        def block_top(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # gather and take: on CPU a little faster than index_select and indexing
            columns = block.gather(-1, self.latents.expand(block.shape[0], -1))
            top = columns.topk(n_out, dim=-1, sorted=False)
            return top.values, self.latents.take(top.indices)

        return _by_blocks(hidden_pre, n_out, n_dead, block_top)

    def within(self, start: int, stop: int) -> GatheredDeadLatents:
        """Kept by a boolean mask, whose result's size the host reads back (a synchronisation)."""
        held = (self.latents >= start) & (self.latents < stop)
        return GatheredDeadLatents(self.latents[held] - start)


class MaskedDeadLatents(NamedTuple):
    """The pick that ranks every column of a range in place: cheap when nearly all are dead.

    Each token's ``n_pick + n_live`` largest pre-activations of the range hold
    its ``n_pick`` largest dead ones, as at most ``n_live`` live latents can
    outrank them; the live ones among those candidates are then dropped (set
    to ``-inf``, which a masked top-k, sparsify's AuxK, does to the whole
    matrix first). Nothing of the pre-activations is copied: the ranking reads
    them where they are.
    """

    #: which latents of the range are dead
    dead: torch.Tensor
    #: the range's first latent
    start: int
    #: at most this many of the range's latents are live (exact in one process)
    n_live: int

    def top(self, hidden_pre: torch.Tensor, n_pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.dead.numel()
        n_candidates = min(n_pick + self.n_live, width)
        n_out = min(n_pick, n_candidates)
        columns = hidden_pre[:, self.start : self.start + width]

        def block_top(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            top = block.topk(n_candidates, dim=-1, sorted=False)
            if self.n_live == 0:  # every candidate is dead
                values, positions = top.values, top.indices
            else:
                dead_first = torch.where(self.dead[top.indices], top.values, -torch.inf)
                kept = dead_first.topk(n_out, dim=-1, sorted=False)
                values, positions = kept.values, top.indices.gather(-1, kept.indices)
            return values, positions + self.start

        return _by_blocks(columns, n_out, n_candidates, block_top)

    def within(self, start: int, stop: int) -> MaskedDeadLatents:
        first = max(self.start, start)
        last = max(min(self.start + self.dead.numel(), stop), first)  # empty where they miss
        dead = self.dead[first - self.start : last - self.start]
        return MaskedDeadLatents(dead, first - start, self.n_live)


def dead_latent_pick(
    dead: torch.Tensor, start: int, n_dead: int, masked_from: float = MASKED_PICK_FROM
) -> DeadLatentPick:
    """The cheaper pick of the range of latents from ``start`` whose dead flags are ``dead``.

    ``n_dead`` is how many are (a host number: the step reads it anyway).
    The masked pick once at least ``masked_from`` of them are dead, else the
    gathered one; ``masked_from`` 0 or above 1 forces one of them (for tests).
    """
    width = dead.numel()
    if n_dead >= masked_from * width:
        return MaskedDeadLatents(dead, start, width - n_dead)
    latents = torch.nonzero_static(dead, size=n_dead).squeeze(1) + start
    return GatheredDeadLatents(latents)
