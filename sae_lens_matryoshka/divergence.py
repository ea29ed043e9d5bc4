"""A diverging run is a failure: training stops, with the last checkpoint from before it.

A learning rate far too high does not always overflow: through SAELens's
runner a run at ``lr=1e4`` reaches an MSE of 5e31, saves every checkpoint
and its final SAE, and exits 0. What it never does is reconstruct its input:
its fraction of variance unexplained (FVU, the full dictionary's MSE over
the batch's variance; 1 is what predicting the mean gives) stays far above 1.
A sound run leaves 1 behind within its first steps and never comes back (a
sparsity penalty or a narrower level raises its MSE, not above the mean's).

:class:`DivergenceWatch` (``sae.divergence``) reads each training step's FVU,
which the step's one host read carries: a run whose FVU stays above
``divergence_fvu`` (default 2, an explained variance below -1) for
``divergence_patience`` consecutive steps (default 100) stops with
:class:`TrainingDiverged`, naming the step, the FVU and the limit. While the
FVU is above the limit, no checkpoint is written (``io.checkpoints``) and the
final SAE is not saved (``io.save_paths``), so the last checkpoint on disk is
from before the divergence. ``divergence_patience=0`` turns the watch off.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig


class TrainingDiverged(FloatingPointError):
    """The run's reconstruction has been far worse than the mean's for too many steps."""


class DivergenceWatch:
    """Counts the consecutive training steps whose FVU is above ``fvu_limit``."""

    def __init__(self, fvu_limit: float, patience: int) -> None:
        self.fvu_limit = fvu_limit
        self.patience = patience
        #: consecutive steps above the limit, and the first of them
        self.streak = 0
        self.streak_start: int | None = None

    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> DivergenceWatch:
        return cls(cfg.divergence_fvu, cfg.divergence_patience)

    @property
    def suspect(self) -> bool:
        """Whether the latest step's reconstruction was above the limit (nothing should be saved)."""
        return self.patience > 0 and self.streak > 0

    def observe(self, step: int, fvu: float) -> None:
        """Record step ``step``'s FVU; raise :class:`TrainingDiverged` once the streak is too long.

        A batch without variance (constant activations) says nothing and is skipped.
        """
        if self.patience == 0 or math.isnan(fvu):
            return
        if fvu <= self.fvu_limit:
            self.streak, self.streak_start = 0, None
            return
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.streak >= self.patience:
            raise TrainingDiverged(
                f"Training step {step}: the run is diverging. Its fraction of variance "
                f"unexplained (full-dictionary MSE / batch variance) is {fvu:.3g}, and has been "
                f"above divergence_fvu={self.fvu_limit:g} for {self.streak} consecutive steps "
                f"since step {self.streak_start} (divergence_patience={self.patience}); 1 is "
                "what predicting the mean gives. No checkpoint was written and nothing was "
                "saved since then, so the last checkpoint is from before it. Lower the "
                "learning rate (or check the activations' scale: normalize_activations), "
                "or set divergence_patience=0 to train on regardless."
            )
