"""Which part of the dictionary a training SAE holds: all of it, or one shard's latents.

A latent-sharded run splits one dictionary of ``d_sae`` latents into
``n_shards`` equal, contiguous slices, one per rank of a shard group (see
``sharding``). What a rank holds is a property of its SAE, fixed when the SAE
is built (``MatryoshkaTrainingSAE.build_shard``), not of the batch-global
operations its steps use (``collectives``): the SAE numbers its latents from
0 within its part, and a :class:`LatentPart` translates the whole
dictionary's numbering (level bounds, dead latents) into that, and says which
part a checkpoint holds. An SAE built any other way holds the whole
dictionary, for which every translation is the identity and costs nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sae_lens_matryoshka.kernels.selection import DeadLatentPick
from sae_lens_matryoshka.levels import LevelPlan


class LatentPart(NamedTuple):
    """Latents ``[start, stop)`` of the dictionary: shard ``shard`` of ``n_shards`` equal slices."""

    start: int
    stop: int
    shard: int = 0
    n_shards: int = 1

    @classmethod
    def whole(cls, d_sae: int) -> LatentPart:
        """The whole dictionary of ``d_sae`` latents, held by one process."""
        return cls(0, d_sae)

    @property
    def is_whole(self) -> bool:
        return self.n_shards == 1

    @property
    def name(self) -> str:
        """The folder of this part of a sharded checkpoint: ``shard-<s>-of-<n>``."""
        return f"shard-{self.shard}-of-{self.n_shards}"

    def checkpoint_record(self) -> dict[str, Any] | None:
        """What a checkpoint of this part records about it (``None``: the whole dictionary).

        ``checkpoints`` writes it beside each shard's part and refuses to
        resume a part as another (``checkpoints.check_part``).
        """
        if self.is_whole:
            return None
        return {
            "name": self.name,
            "shard": self.shard,
            "n_shards": self.n_shards,
            "latents": [self.start, self.stop],
        }

    def local_plan(self, plan: LevelPlan) -> LevelPlan:
        """``plan`` with its group bounds in this part's latent numbering (clipped to the part)."""
        if self.is_whole:
            return plan
        bounds = (plan.bounds - self.start).clamp(0, self.stop - self.start)
        return LevelPlan(plan.widths, bounds, plan.weights)

    def held(self, dead: DeadLatentPick) -> DeadLatentPick:
        """The pick of the dead latents this part holds, in its numbering.

        The whole dictionary holds every one as it is numbered: ``dead``
        itself, no op. A shard restricts the pick to its range: the gathered
        pick by a boolean mask, whose result's size the host reads back (on a
        GPU, a host synchronisation); the masked pick by a slice.
        """
        if self.is_whole:
            return dead
        return dead.within(self.start, self.stop)
