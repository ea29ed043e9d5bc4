"""SAELens's trainer's progress bar: counts every step of a Matryoshka run and ends at 100%, or hidden.

SAELens's trainer advances its bar by ``100 * batch`` samples every 100 steps,
so a run whose step count is not a multiple of 100 ends short of 100%, and
the last batch can carry it past its total. ``install`` (called when the
plugin registers) makes the bar of a Matryoshka run show the samples trained
so far after every step, capped at the total: it never goes back and never
passes its total, and ends at exactly 100%. SAELens's own update still sets
the loss description every 100 steps, but its advance is dropped (added to
ours it would overshoot and then be pulled back). Other SAEs are left as
SAELens has them. ``hidden_trainer_bar`` hides the trainer's bar where one
bar covers many trainings (the toy demo) or where another rank shows it
(under ``torchrun``, see ``distributed.quiet_other_ranks``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from sae_lens.training import sae_trainer
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_lens_matryoshka.config import trains_matryoshka


class _DescriptionOnly:
    """A bar as SAELens's ``_update_pbar`` sees it: descriptions pass, advances are dropped."""

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        self._bar.set_description(*args, **kwargs)

    def update(self, n: float = 1) -> None:
        """Dropped: ``advance`` sets the position from the samples trained."""


def advance(bar: tqdm, n_samples: int) -> None:
    """Move ``bar`` forward to ``n_samples``, capped at its total; never backwards."""
    target = n_samples if bar.total is None else min(n_samples, bar.total)
    if target > bar.n:
        bar.update(target - bar.n)


def install() -> None:
    """Make SAELens's progress bar count every step of a Matryoshka run. Idempotent."""
    if getattr(SAETrainer, "_matryoshka_progress", False):
        return
    update = SAETrainer._update_pbar

    @functools.wraps(update)
    def _update_pbar(
        self: SAETrainer[Any, Any], step_output: Any, pbar: tqdm, **kwargs: Any
    ) -> None:
        if not trains_matryoshka(self):
            update(self, step_output, pbar, **kwargs)
            return
        update(self, step_output, _DescriptionOnly(pbar), **kwargs)
        advance(pbar, self.n_training_samples)

    SAETrainer._update_pbar = _update_pbar
    SAETrainer._matryoshka_progress = True


@contextlib.contextmanager
def hidden_trainer_bar() -> Iterator[None]:
    """SAELens's trainers started inside show no progress bar."""
    bar = sae_trainer.tqdm
    sae_trainer.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        sae_trainer.tqdm = bar
