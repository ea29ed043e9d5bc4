"""SAELens's trainer's progress bar: ends at 100% for a Matryoshka run, or hidden.

SAELens's trainer advances its bar only every 100 steps, so a run whose step
count is not a multiple of 100 ends short of 100%. ``install`` (called when
the plugin registers) makes the bar count every step of a Matryoshka run;
the loss description still changes every 100 steps. Other SAEs are left as
SAELens has them. ``hidden_trainer_bar`` hides the trainer's bar where one bar
covers many trainings (the toy demo) or where another rank shows it (under
``torchrun``, see ``distributed.quiet_other_ranks``).
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


def install() -> None:
    """Make SAELens's progress bar count every step of a Matryoshka run. Idempotent."""
    if getattr(SAETrainer, "_matryoshka_progress", False):
        return
    update = SAETrainer._update_pbar

    @functools.wraps(update)
    def _update_pbar(
        self: SAETrainer[Any, Any], step_output: Any, pbar: tqdm, **kwargs: Any
    ) -> None:
        update(self, step_output, pbar, **kwargs)
        if trains_matryoshka(self):
            # up to the samples trained so far, not the last multiple of 100 steps
            pbar.update(self.n_training_samples - pbar.n)

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
