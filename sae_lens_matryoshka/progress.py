"""SAELens's trainer's progress bar: in steps, with the loss, for a Matryoshka run; or hidden.

SAELens's trainer shows a bar over the training samples (tokens, counted as
``it``) under a description of every loss term, 150 to 250 characters that
change every 100 steps, and advances it by ``100 * batch`` samples every 100
steps: a run whose step count is not a multiple of 100 ends short of 100%,
and the last batch can carry it past its total. ``install`` (called when the
plugin registers) gives a Matryoshka run a bar over its steps instead::

    Training Matryoshka SAE: 100%|██████████| 101/101 [00:06<00:00, 14.76step/s, loss=6.769]

- its total is the run's steps, ``ceil(total_training_samples /
  train_batch_size_samples)``, and a resumed trainer's bar starts at the
  step it resumes from;
- after every step it shows the steps completed, capped at the total: it
  never goes back, never passes its total, and ends at exactly 100%;
- where SAELens would rewrite its description (every 100 steps), the step's
  overall loss shows as a postfix instead. Reading it is the one host read
  the bar makes, where SAELens read every loss term: no step waits for
  the device where it did not before.

Other SAEs keep SAELens's bar. ``hidden_trainer_bar`` hides the trainer's bar
where one bar covers many trainings (the toy demo) or where another rank
shows it (under ``torchrun``, see ``distributed.quiet_other_ranks``); it
hides a Matryoshka run's bar too, since that bar is made by whatever makes
SAELens's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training import sae_trainer
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_lens_matryoshka.config import trains_matryoshka

#: a Matryoshka run's bar's label, in place of SAELens's description of every loss
LABEL = "Training Matryoshka SAE"
#: how often (in steps) SAELens's ``_update_pbar`` rewrites the description by default
LOSS_EVERY = 100

BarMaker = Callable[..., tqdm]


def steps_of(trainer: SAETrainer[Any, Any], n_samples: int) -> int:
    """The batches of ``trainer``'s size that ``n_samples`` fill, the last one in part.

    Every step trains one full batch, so for the samples trained this is the
    steps completed, and for the total the run's steps (the last step passes
    the total). Counted from the samples rather than ``n_training_steps``, a
    resumed bar still ends at exactly its total when the batch size changed
    between the runs (the saved step count then counts batches of another size).
    """
    batch = trainer.cfg.train_batch_size_samples
    return (n_samples + batch - 1) // batch


def advance(bar: tqdm, n: int) -> None:
    """Move ``bar`` forward to ``n``, capped at its total; never backwards."""
    target = n if bar.total is None else min(n, bar.total)
    if target > bar.n:
        bar.update(target - bar.n)


def _step_bar(trainer: SAETrainer[Any, Any], make_bar: BarMaker) -> BarMaker:
    """What makes ``trainer``'s bar over its steps, with ``make_bar``; SAELens's counts are ignored.

    SAELens's ``fit`` asks for a bar over samples (``total``, ``initial``,
    ``desc``); all three are given here in steps and the label instead.
    """

    def make(**_: Any) -> tqdm:
        total = steps_of(trainer, trainer.cfg.total_training_samples)
        done = min(steps_of(trainer, trainer.n_training_samples), total)
        return make_bar(total=total, initial=done, desc=LABEL, unit="step")

    return make


@contextlib.contextmanager
def _trainer_bars(make: Callable[[BarMaker], BarMaker]) -> Iterator[None]:
    """Inside, SAELens's trainer makes its bar with ``make`` of the maker it had.

    ``fit`` makes its bar with ``sae_trainer.tqdm``, its one use of it;
    building on the maker in place lets this plugin's replacements nest
    (a hidden Matryoshka bar is a step bar made by a hidden maker).
    """
    bar = sae_trainer.tqdm
    sae_trainer.tqdm = make(bar)
    try:
        yield
    finally:
        sae_trainer.tqdm = bar


def install() -> None:
    """Make SAELens's progress bar of a Matryoshka run count its steps and show its loss. Idempotent."""
    if getattr(SAETrainer, "_matryoshka_progress", False):
        return
    fit = SAETrainer.fit
    update = SAETrainer._update_pbar

    @functools.wraps(fit)
    def _fit(self: SAETrainer[Any, Any]) -> Any:
        if not trains_matryoshka(self):
            return fit(self)
        with _trainer_bars(functools.partial(_step_bar, self)):
            return fit(self)

    @functools.wraps(update)
    def _update_pbar(
        self: SAETrainer[Any, Any],
        step_output: TrainStepOutput,
        pbar: tqdm,
        update_interval: int = LOSS_EVERY,
    ) -> None:
        if not trains_matryoshka(self):
            update(self, step_output, pbar, update_interval=update_interval)
            return
        advance(pbar, steps_of(self, self.n_training_samples))
        # where SAELens read every loss to describe them; a hidden bar reads none
        if self.n_training_steps % update_interval == 0 and not pbar.disable:
            pbar.set_postfix_str(f"loss={step_output.loss.item():.4g}")

    SAETrainer.fit = _fit
    SAETrainer._update_pbar = _update_pbar
    SAETrainer._matryoshka_progress = True


@contextlib.contextmanager
def hidden_trainer_bar() -> Iterator[None]:
    """SAELens's trainers started inside show no progress bar."""
    with _trainer_bars(lambda make_bar: functools.partial(make_bar, disable=True)):
        yield
