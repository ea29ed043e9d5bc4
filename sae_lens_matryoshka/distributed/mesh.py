"""The ranks of a distributed run as a mesh: replicas x latent shards, and the collectives over it.

A run under ``torchrun`` arranges its ``world_size = n_replicas * n_shards``
ranks in a grid. The ranks of one *shard group* (``n_shards`` consecutive
ranks, one replica) hold disjoint slices of one dictionary's latents and read
the same tokens; the ranks of one *replica group* (the same shard in every
replica) hold the same latents and read different tokens. ``n_shards = 1`` is
plain data parallelism, ``n_replicas = 1`` plain latent sharding.

:class:`MeshCollectives` gives a training step its batch-global operations
over that grid, so that every rank computes exactly what one process would on
the whole batch with the whole dictionary:

- BatchTopK keeps the ``k * n_tokens * n_replicas`` largest pre-activations of
  every rank together: each rank ranks its own, the ranks find the global
  cut-off among them by a bisection that exchanges only counts, and each keeps
  its entries at or above it; TopK and the dead-latent selection exchange each
  token's largest values within the shard group and cut per token;
- each shard decodes its own latents' part of every level and one all-reduce
  over the shard group sums the parts (``b_dec`` is added by the first shard,
  so its gradient is counted once);
- the dead-latent mask, the inference threshold and batch sums are combined
  over the replicas, and the activations SAELens's trainer counts are
  gathered over the shards, so its statistics and logs cover the whole
  dictionary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from typing_extensions import override

from sae_lens_matryoshka.collectives import Collectives, kept_entries
from sae_lens_matryoshka.kernels.selection import Selection, batch_topk_entries
from sae_lens_matryoshka.latent_part import LatentPart

TIMEOUT_ENV = "SAE_MATRYOSHKA_COLLECTIVE_TIMEOUT"

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective operation across ranks failed: another rank died, stalled or diverged."""


def collective(what: str, operation: Callable[[], T]) -> T:
    """Run ``operation``, turning a failure into a :class:`CollectiveError` that says ``what``."""
    try:
        return operation()
    except (RuntimeError, dist.DistError) as error:
        raise CollectiveError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed. Another rank "
            f"has probably died or stalled (the collective timeout is set by {TIMEOUT_ENV}, "
            f"in seconds). Cause: {error}"
        ) from error


class Mesh(NamedTuple):
    """This rank's place in the grid of replicas x latent shards, and its two process groups."""

    n_shards: int
    n_replicas: int
    #: this rank's shard (which slice of the latents) and replica (which tokens)
    shard: int
    replica: int
    #: the ranks of this replica (same tokens, every slice of the latents)
    shard_group: Any
    #: the ranks holding this shard (same latents, every replica's tokens)
    replica_group: Any

    @classmethod
    def of_world(cls, n_shards: int) -> Mesh:
        """The mesh of the initialised process group, with ``n_shards`` shards per replica.

        Every rank must call this (creating a process group is collective).
        Consecutive ranks form a shard group, so on multi-GPU machines the
        all-reduce of every step stays within a machine.
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        if n_shards < 1 or world % n_shards:
            raise ValueError(
                f"the {world} ranks cannot be split into groups of {n_shards} latent shards: "
                f"the world size must be a multiple of the shard count."
            )
        n_replicas = world // n_shards
        shard_groups = [
            dist.new_group(list(range(r * n_shards, (r + 1) * n_shards))) for r in range(n_replicas)
        ]
        replica_groups = [dist.new_group(list(range(s, world, n_shards))) for s in range(n_shards)]
        shard, replica = rank % n_shards, rank // n_shards
        return cls(
            n_shards, n_replicas, shard, replica, shard_groups[replica], replica_groups[shard]
        )

    def latent_range(self, d_sae: int) -> tuple[int, int]:
        """The latents this rank holds, ``[start, stop)``."""
        if d_sae % self.n_shards:
            raise ValueError(
                f"d_sae={d_sae} latents cannot be split into {self.n_shards} equal shards: "
                "use a d_sae divisible by the shard count."
            )
        size = d_sae // self.n_shards
        return self.shard * size, (self.shard + 1) * size

    def part(self, d_sae: int) -> LatentPart:
        """The part of a ``d_sae``-latent dictionary this rank holds (all of it if unsharded)."""
        return LatentPart(*self.latent_range(d_sae), self.shard, self.n_shards)

    def first_rank_of(self, group: Any) -> int:
        """The global rank of ``group``'s first member (its replica 0 or shard 0)."""
        return int(dist.get_global_rank(group, 0))


def _all_gather(tensor: torch.Tensor, group: Any, what: str) -> list[torch.Tensor]:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    collective(what, lambda: dist.all_gather(gathered, tensor.contiguous(), group=group))
    return gathered


def _all_reduce(tensor: torch.Tensor, group: Any, what: str, op: Any = None) -> torch.Tensor:
    """``tensor`` reduced over ``group`` (a sum unless ``op`` says otherwise), in place if contiguous."""
    reduced = tensor if tensor.is_contiguous() else tensor.contiguous()
    operation = dist.ReduceOp.SUM if op is None else op
    collective(what, lambda: dist.all_reduce(reduced, op=operation, group=group))
    return reduced


def _per_token_cut(values: torch.Tensor, n_keep: int, group: Any, what: str) -> torch.Tensor:
    """Each token's ``n_keep``-th largest value over the group's ``values [n_tokens, m]``.

    Every rank offers the same number of candidates per token (padded with
    ``-inf``); the result is ``[n_tokens, 1]``.
    """
    every = torch.cat(_all_gather(values, group, what), dim=-1)
    return every.topk(n_keep, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values


#: pivots per round of the global cut-off search: each round narrows the bracket
#: of bit patterns 256-fold for one all-reduce of this many counts
_PIVOTS = 255


def global_cutoff(values: torch.Tensor, n_keep: int, what: str) -> torch.Tensor:
    """The ``n_keep``-th largest of every rank's positive ``values`` together; 0 if fewer.

    Exact, and without exchanging the values: positive floats order like the
    integers their bits spell, so a bisection over bit patterns finds the
    cut-off. Each round every rank counts its values at or above ``_PIVOTS``
    pivots spread over the bracket, one all-reduce sums the counts, and the
    bracket narrows to the gap between the last pivot that ``n_keep`` values
    reach and the next. A fixed number of rounds (4 for float32, 8 for
    float64) pins the cut-off's bit pattern, and each rank sends ``_PIVOTS``
    counts a round however many ranks there are (gathering every rank's
    candidates would cost each rank ``n_keep`` values per rank of the world).
    Each round reads two numbers back to the host: indexing ``pivots`` with
    the 0-d ``n_reached`` (for the new ``lo`` and ``hi``) is an ``.item()``,
    so 8 host synchronisations for float32 and 16 for float64.
    """
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    n_bits = 8 * values.element_size() - 1  # the sign bit of a positive float is 0
    keys = values.view(bits).to(torch.int64).sort().values
    # invariant: at least n_keep values reach lo (or lo = 0), fewer than n_keep reach hi
    lo = torch.zeros((), dtype=torch.int64, device=values.device)
    infinity = torch.tensor(torch.inf, dtype=values.dtype, device=values.device)
    hi = infinity.view(bits).to(torch.int64) + 1  # above every positive value's bits
    steps = torch.arange(1, _PIVOTS + 1, device=values.device)
    for _ in range(math.ceil(n_bits / math.log2(_PIVOTS + 1))):
        stride = (hi - lo - 1) // (_PIVOTS + 1) + 1  # rounded up: gaps of at most stride
        pivots = torch.minimum(lo + stride * steps, hi)
        reaching = keys.numel() - torch.searchsorted(keys, pivots)
        reached = _all_reduce(reaching, None, what) >= n_keep  # True, then False
        n_reached = reached.sum()
        lo = torch.where(n_reached > 0, pivots[(n_reached - 1).clamp(min=0)], lo)
        hi = torch.where(n_reached < _PIVOTS, pivots[n_reached.clamp(max=_PIVOTS - 1)], hi)
    return lo.to(bits).view(values.dtype)


def _kept_token_major(
    values: torch.Tensor, positions: torch.Tensor, cut: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(token, position, value)`` of the values at or above each token's cut, token-major."""
    positions, order = positions.sort(dim=-1)
    values = values.gather(-1, order)
    keep = (values >= cut) & torch.isfinite(cut)
    token = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(positions)
    return token[keep], positions[keep], values[keep]


def _per_token_top(
    values: torch.Tensor, n_keep: int, group: Any, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token, position, value)`` of this rank's share of each token's ``n_keep`` largest over the group.

    Each rank offers its own largest per token (:func:`_group_share`).
    """
    top = values.topk(min(n_keep, values.shape[-1]), dim=-1, sorted=False)
    return _group_share(top.values, top.indices, n_keep, group, what)


def _group_share(
    values: torch.Tensor, positions: torch.Tensor, n_keep: int, group: Any, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's candidates among each token's ``n_keep`` largest over the group, token-major.

    ``values [n_tokens, m]`` (``m <= n_keep``) at ``positions`` are this rank's
    candidates; returned are ``(token, position, value)`` of those kept. Every rank offers ``n_keep`` values per token (padded with ``-inf``), the
    group agrees on each token's cut among them, and each keeps its finite
    candidates at or above it.
    """
    padded = values.new_full((values.shape[0], n_keep), -torch.inf)
    padded[:, : values.shape[-1]] = values
    cut = _per_token_cut(padded, n_keep, group, what)
    return _kept_token_major(values, positions, cut)


class _SumOverShards(torch.autograd.Function):
    """The sum of every shard's ``partial``; its gradient is the sum's, on every shard."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, group: Any) -> torch.Tensor:
        del ctx
        return _all_reduce(partial.clone(), group, "summing the shards' reconstructions")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every shard computes the same loss from the same sum
        del ctx
        return grad, None


class MeshCollectives(Collectives):
    """The batch-global operations of a step over a mesh of replicas x latent shards."""

    def __init__(self, mesh: Mesh, d_sae: int) -> None:
        self.mesh = mesh
        #: where this rank's latents start in the whole dictionary's numbering
        self.start = mesh.latent_range(d_sae)[0]
        self.d_sae = d_sae

    @property
    def sharded(self) -> bool:
        return self.mesh.n_shards > 1

    @override
    def batch_topk(self, hidden_pre: torch.Tensor, k: float, count_on_host: bool) -> Selection:
        """This rank's share of the BatchTopK selection over every rank's pre-activations.

        The global batch keeps its ``k * n_tokens * n_replicas`` largest
        positive values. No rank can contribute more than that, so each takes
        its own top that many (at most all it has), the ranks agree on the
        global cut-off among those (:func:`global_cutoff`), and each keeps
        its entries at or above it. Exact up to ties at the cut-off across ranks,
        and read back to the host whatever ``count_on_host`` says.
        """
        del count_on_host  # the ranks' agreement on the cut-off reads counts anyway
        n_tokens = hidden_pre.shape[0] * self.mesh.n_replicas
        n_keep = kept_entries(k, n_tokens, n_tokens * self.d_sae)
        token, latent, _ = batch_topk_entries(hidden_pre, min(n_keep, hidden_pre.numel()))
        values = hidden_pre[token, latent]
        keep = values >= global_cutoff(values, n_keep, "the global BatchTopK selection")
        return Selection(token[keep], latent[keep])

    @override
    def topk(self, hidden_pre: torch.Tensor, k: int) -> Selection:
        if not self.sharded:
            return super().topk(hidden_pre, k)
        token, latent, _ = _per_token_top(
            hidden_pre, k, self.mesh.shard_group, "the global TopK selection"
        )
        return Selection(token, latent)

    @override
    def dead_topk(
        self, values: torch.Tensor, latents: torch.Tensor, n_pick: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.sharded:
            return super().dead_topk(values, latents, n_pick)
        what = "selecting dead latents for the auxiliary loss"
        return _group_share(values, latents, n_pick, self.mesh.shard_group, what)

    @override
    def dead_everywhere(self, dead: torch.Tensor) -> torch.Tensor:
        """Dead in every replica (fired on none of their tokens within the window)."""
        flags = dead.to(torch.uint8)
        what = "agreeing on dead latents"
        return _all_reduce(flags, self.mesh.replica_group, what, dist.ReduceOp.MIN).bool()

    @override
    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        return _all_reduce(value.clone(), None, "agreeing on the threshold", dist.ReduceOp.MIN)

    @override
    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        # shards of a replica hold the same tokens: only the replicas' parts add up
        return _all_reduce(partial.clone(), self.mesh.replica_group, "summing over the batch")

    @override
    def decoder_bias(self, b_dec: torch.Tensor) -> torch.Tensor:
        if self.mesh.shard == 0:
            return b_dec
        return torch.zeros_like(b_dec, requires_grad=False)

    @override
    def whole_reconstruction(self, part: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return part
        whole: torch.Tensor = _SumOverShards.apply(part, self.mesh.shard_group)
        return whole

    @override
    def whole_feature_acts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Every shard's active entries as one ``[*batch, d_sae]`` sparse tensor (no graph).

        What SAELens's trainer counts (firing, dead latents, L0) then covers the
        whole dictionary. Costs host synchronisations every step: reading each
        shard's entry count (``n_shards`` scalars, after one all-gather), which
        sizes the padded exchange, and ``coalesce`` (its number of distinct
        entries).
        """
        if not self.sharded:
            return feature_acts
        group, what = self.mesh.shard_group, "gathering the active latents"
        indices, values = feature_acts.indices(), feature_acts.values()
        shift = torch.zeros(indices.shape[0], 1, dtype=indices.dtype, device=indices.device)
        shift[-1] = self.start  # the latent dimension, into the whole dictionary's numbering
        count = torch.tensor([values.numel()], device=values.device)
        counts = [int(c) for c in _all_gather(count, group, what)]
        padded_indices = indices.new_zeros((indices.shape[0], max(counts)))
        padded_indices[:, : values.numel()] = indices + shift
        padded_values = values.new_zeros(max(counts))
        padded_values[: values.numel()] = values
        every_index = _all_gather(padded_indices, group, what)
        every_value = _all_gather(padded_values, group, what)
        whole = torch.sparse_coo_tensor(
            torch.cat([part[:, :n] for part, n in zip(every_index, counts, strict=True)], 1),
            torch.cat([part[:n] for part, n in zip(every_value, counts, strict=True)]),
            (*feature_acts.shape[:-1], self.d_sae),
        )
        return whole.coalesce()
