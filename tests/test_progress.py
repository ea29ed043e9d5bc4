"""SAELens's trainer's progress bar during a Matryoshka run: forward only, never past its total."""

from __future__ import annotations

import io
import itertools
from typing import Any, ClassVar

import pytest
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training import sae_trainer
from tqdm.auto import tqdm

from sae_lens_matryoshka.progress import advance


class RecordedBar(tqdm):
    """SAELens's bar, writing to a buffer and recording its position after every update."""

    positions: ClassVar[list[float]] = []
    totals: ClassVar[list[float]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})
        RecordedBar.totals.append(self.total)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        RecordedBar.positions.append(self.n)
        return shown


def test_runner_bar_never_overshoots_and_ends_at_its_total(
    tiny_model, token_dataset, runner_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 101 steps of 64 tokens for 6417: SAELens's own advance fires at step 100
    # (by 100 batches), and the last step trains 47 tokens past the total.
    batch, total = 64, 64 * 100 + 17
    monkeypatch.setattr(sae_trainer, "tqdm", RecordedBar)
    RecordedBar.positions.clear()
    RecordedBar.totals.clear()
    cfg = runner_cfg(training_tokens=total, train_batch_size_tokens=batch)
    LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()

    assert RecordedBar.totals == [total]
    positions = RecordedBar.positions
    assert len(positions) == 101  # one advance per step
    assert all(later >= earlier for earlier, later in itertools.pairwise(positions))
    assert max(positions) <= total
    assert positions[-1] == total
    # every step but the last shows exactly the samples trained
    assert positions[:-1] == [batch * step for step in range(1, 101)]


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
