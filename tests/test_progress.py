"""SAELens's trainer's progress bar: a Matryoshka run's bar counts its steps and shows its loss."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.training import sae_trainer
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.progress import LABEL, advance, hidden_trainer_bar
from sae_lens_matryoshka.toy import short_run_trainer_config


class RecordedBar(tqdm):
    """SAELens's bar, writing to a buffer and recording its position and postfix as they change."""

    made: ClassVar[list[RecordedBar]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: everything the bar printed
        self.shown = io.StringIO()
        super().__init__(*args, **{"disable": False, **kwargs, "file": self.shown})
        #: the position after every update
        self.positions: list[float] = []
        #: (position, postfix) at every postfix set
        self.postfixes: list[tuple[float, str]] = []
        RecordedBar.made.append(self)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self.positions.append(self.n)
        return shown

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh)
        self.postfixes.append((self.n, s))


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RecordedBar]]:
    """The bars SAELens's trainer makes from here on."""
    monkeypatch.setattr(sae_trainer, "tqdm", RecordedBar)
    RecordedBar.made.clear()
    yield RecordedBar.made
    RecordedBar.made.clear()


def _trainer(sae: Any, steps: int, batch: int) -> SAETrainer[Any, Any]:
    """A trainer of ``sae`` for ``steps`` steps of ``batch`` random samples, without logging."""
    cfg = short_run_trainer_config(steps, batch_size=batch, lr=1e-3, dead_feature_window=1000)
    generator = torch.Generator().manual_seed(0)
    samples = iter(lambda: torch.randn(batch, sae.cfg.d_in, generator=generator), None)
    return SAETrainer(cfg=cfg, sae=sae, data_provider=samples)


def _matryoshka_sae() -> MatryoshkaTrainingSAE:
    return MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=16, k=2, matryoshka_widths=[4, 16])
    )


def test_runner_bar_counts_steps_to_exactly_its_total_and_shows_the_loss(
    tiny_model, token_dataset, runner_cfg, bars: list[RecordedBar]
) -> None:
    # 101 steps of 64 tokens for 6417: SAELens's own advance fires at step 100
    # (by 100 batches), and the last step trains 47 tokens past the total.
    cfg = runner_cfg(training_tokens=64 * 100 + 17, train_batch_size_tokens=64)
    LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()

    [bar] = bars
    assert (bar.total, bar.unit, bar.desc) == (101, "step", LABEL)
    # one advance per step, by one step: never back, never past the total, ending on it
    assert bar.positions == list(range(1, 102))
    assert bar.n == bar.total
    # the loss shows where SAELens described every loss, after step 100
    [(at, postfix)] = bar.postfixes
    assert at == 100
    name, value = postfix.split("=")
    assert name == "loss" and float(value) > 0
    final = bar.shown.getvalue().split("\r")[-1]
    assert final.startswith(f"{LABEL}: 100%") and "101/101" in final and postfix in final
    assert "mse_loss" not in bar.shown.getvalue()


def test_resumed_bar_starts_at_the_step_it_resumes_from(bars: list[RecordedBar]) -> None:
    trainer = _trainer(_matryoshka_sae(), steps=10, batch=4)
    # as a checkpoint after 6 steps leaves the trainer
    trainer.n_training_samples, trainer.n_training_steps = 6 * 4, 6
    trainer.fit()

    [bar] = bars
    assert (bar.total, bar.initial) == (10, 6)
    assert bar.positions == [7, 8, 9, 10]


def test_resumed_bar_counts_batches_of_the_run_when_the_batch_size_changed(
    bars: list[RecordedBar],
) -> None:
    trainer = _trainer(_matryoshka_sae(), steps=10, batch=4)
    # 12 steps of 1 sample: 3 batches of this run's 4
    trainer.n_training_samples, trainer.n_training_steps = 12, 12
    trainer.fit()

    [bar] = bars
    assert (bar.total, bar.initial, bar.n) == (10, 3, 10)
    assert bar.positions == list(range(4, 11))


def test_hidden_bar_stays_hidden_and_reads_no_loss(bars: list[RecordedBar]) -> None:
    with hidden_trainer_bar():  # 100 steps: a shown bar would read the loss at the last
        _trainer(_matryoshka_sae(), steps=100, batch=2).fit()

    [bar] = bars
    assert bar.disable
    assert bar.postfixes == []
    assert bar.shown.getvalue() == ""


def test_other_saes_keep_saelens_bar(bars: list[RecordedBar]) -> None:
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=8, d_sae=16))
    _trainer(sae, steps=101, batch=2).fit()

    [bar] = bars
    # samples, SAELens's label, its advance of 100 batches at step 100 and its description
    assert (bar.total, bar.unit, bar.n) == (202, "it", 200)
    assert bar.positions == [200]
    assert bar.desc.startswith("100| mse_loss: ")
    assert bar.postfixes == []


def test_advance_caps_at_the_total_and_never_goes_back() -> None:
    bar = tqdm(total=100, file=io.StringIO())
    advance(bar, 60)
    assert bar.n == 60
    advance(bar, 40)  # behind the bar: it stays
    assert bar.n == 60
    advance(bar, 128)  # past the total: it stops there
    assert bar.n == 100
    open_ended = tqdm(file=io.StringIO())
    advance(open_ended, 7)
    assert open_ended.n == 7
