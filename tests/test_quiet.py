"""A Matryoshka run prints none of SAELens's known noise, and every other warning as before."""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, IterableDataset
from sae_lens import LanguageModelSAETrainingRunner, StandardTrainingSAEConfig
from sae_lens.load_model import load_model
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading

from sae_lens_matryoshka import run_record
from sae_lens_matryoshka.cli import main
from sae_lens_matryoshka.quiet import OverrideNotices, ShortDatasetWarning, short_dataset_message

from .conftest import (
    CONTEXT,
    D_MODEL,
    HOOK,
    build_token_dataset,
    save_hf_model_folder,
    tiny_model_cfg,
)

#: what a Matryoshka run no longer prints (each as SAELens, torch or TransformerLens words it)
NOISE = (
    "You just passed in a",
    "To copy construct from a tensor",
    "The training dataset contains fewer samples",
    "HookedTransformer is deprecated",
    "HookedTransformer.from_pretrained is deprecated",
)
STORE_FILE = str(Path("sae_lens", "training", "activations_store.py"))
EPOCH_NOTICE = "All samples in the training dataset have been exhausted, beginning new epoch."


@pytest.fixture
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning raised inside, shown or not by the test run's filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _texts(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught]


def _noise_in(text: str) -> list[str]:
    return [noise for noise in NOISE if noise in text]


def _real_warnings_hook() -> Callable[[torch.Tensor, Any], None]:
    """A hook raising what the user's code might: its own warning, torch's copy advice, a log line."""

    def warn(activation: torch.Tensor, hook: Any) -> None:
        warnings.warn("a warning from the user's hook", UserWarning, stacklevel=1)
        torch.tensor(activation)  # torch's copy advice, to this file's code: it must show
        logging.getLogger("sae_lens").warning("an unrelated SAELens notice")

    return warn


def test_a_matryoshka_run_shows_no_known_noise_and_every_real_warning(
    runner_cfg, tiny_model, token_dataset, recorded, capfd, caplog
) -> None:
    """64 sequences of 16 tokens for a 1,280-token run: short, as the run says in tokens."""
    tiny_model.add_hook(HOOK, _real_warnings_hook(), is_permanent=True)
    cfg = runner_cfg(training_tokens=64 * 20, n_eval_batches=2, verbose=True)
    with caplog.at_level(logging.WARNING):
        runner = LanguageModelSAETrainingRunner(
            cfg, override_dataset=token_dataset, override_model=tiny_model
        )
        runner.run()
    out, err = capfd.readouterr()
    # the hook's own copy advice (below) is this file's, not noise from the run
    raised_by_the_run = _texts([w for w in recorded if w.filename != __file__])
    assert not [
        noise for text in [*raised_by_the_run, caplog.text, out, err] for noise in _noise_in(text)
    ]
    # the messages that replace or outlive the noise, and the real ones, all show
    (short,) = [warning for warning in recorded if warning.category is ShortDatasetWarning]
    assert str(short.message) == (
        "the dataset holds 1,024 tokens (64 sequences of 16), fewer than training_tokens=1,280: "
        "training passes over it 1.25 times. Give a larger dataset, or set training_tokens to "
        "at most 1,024 for one pass."
    )
    assert short.filename == __file__  # the line that called run()
    assert any(
        warning.filename.endswith(STORE_FILE) and str(warning.message) == EPOCH_NOTICE
        for warning in recorded
    )
    assert "a warning from the user's hook" in _texts(recorded)
    copies = [warning for warning in recorded if "copy construct" in str(warning.message)]
    assert copies
    assert {warning.filename for warning in copies} == {__file__}
    assert "an unrelated SAELens notice" in caplog.text
    assert "each level, on 2 further batches" in out  # the run's own summary is untouched
    assert not any(isinstance(f, OverrideNotices) for f in logging.getLogger("sae_lens").filters)


def test_a_standard_run_is_left_as_saelens_has_it(
    runner_cfg, tiny_model, token_dataset, recorded, caplog
) -> None:
    cfg = runner_cfg(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64), training_tokens=64 * 4)
    with caplog.at_level(logging.WARNING):
        LanguageModelSAETrainingRunner(
            cfg, override_dataset=token_dataset, override_model=tiny_model
        ).run()
    assert "You just passed in a dataset" in caplog.text
    assert "You just passed in a model" in caplog.text
    from_store = [str(w.message) for w in recorded if w.filename.endswith(STORE_FILE)]
    assert any("contains fewer samples (64)" in text for text in from_store)
    assert any("To copy construct from a tensor" in text for text in from_store)
    assert not [warning for warning in recorded if warning.category is ShortDatasetWarning]


def test_the_runs_own_warnings_still_name_the_line_that_called_run(
    runner_cfg, tiny_model, token_dataset, recorded, monkeypatch
) -> None:
    monkeypatch.setattr(run_record, "mostly_dead", lambda rows: "dead latents, as the test says")
    cfg = runner_cfg(training_tokens=64 * 2, n_eval_batches=1)
    LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    (dead,) = [w for w in recorded if w.category is run_record.DeadLatentsWarning]
    assert dead.filename == __file__


@pytest.fixture
def hub_model_loads_offline(tiny_model: HookedTransformer, monkeypatch: pytest.MonkeyPatch) -> None:
    """TransformerLens's ``from_pretrained`` runs as for a Hub model, its config and weights local."""
    state_dict = tiny_model.state_dict()
    monkeypatch.setattr(loading, "get_official_model_name", lambda name: name)
    monkeypatch.setattr(loading, "get_pretrained_model_config", lambda *a, **k: tiny_model_cfg())
    monkeypatch.setattr(loading, "get_pretrained_state_dict", lambda *a, **k: dict(state_dict))


def test_transformer_lens_deprecations_are_dropped_where_the_runner_loads_the_model(
    hub_model_loads_offline, runner_cfg, token_dataset, recorded
) -> None:
    load_model("HookedTransformer", "tiny-random", device="cpu")  # the control: SAELens's load
    deprecations = [str(w.message) for w in recorded if w.category is DeprecationWarning]
    assert [text for text in deprecations if _noise_in(text)], "the load warns as it does today"
    recorded.clear()
    runner = LanguageModelSAETrainingRunner(runner_cfg(), override_dataset=token_dataset)
    assert isinstance(runner.model, HookedTransformer)
    assert not [noise for text in _texts(recorded) for noise in _noise_in(text)]


def _store(dataset: Any, tokenized: bool = True, per_sequence: int = CONTEXT) -> Any:
    return types.SimpleNamespace(
        activations_store=types.SimpleNamespace(
            dataset=dataset, is_dataset_tokenized=tokenized, training_context_size=per_sequence
        ),
        cfg=types.SimpleNamespace(training_tokens=20_000),
    )


def test_the_dataset_is_measured_in_tokens() -> None:
    """400 sequences of 1024 tokens are 409,600 tokens: SAELens called them short of 20,000."""
    rows = Dataset.from_dict({"input_ids": [[0]] * 400})  # the count of rows is what is read
    assert short_dataset_message(_store(rows, per_sequence=1024)) is None
    assert short_dataset_message(_store(rows, per_sequence=16)) == (
        "the dataset holds 6,400 tokens (400 sequences of 16), fewer than "
        "training_tokens=20,000: training passes over it 3.12 times. Give a larger dataset, "
        "or set training_tokens to at most 6,400 for one pass."
    )
    # tokens unknown before training: text is tokenized as read; a stream has no length
    assert short_dataset_message(_store(rows, tokenized=False)) is None
    stream = IterableDataset.from_generator(lambda: iter([{"input_ids": [0]}]))
    assert short_dataset_message(_store(stream)) is None


def test_the_command_line_run_is_quiet(tmp_path: Path, recorded, capfd) -> None:
    """``sae-lens-matryoshka train`` from local folders builds the same runner."""
    model = save_hf_model_folder(tmp_path / "model")
    build_token_dataset().save_to_disk(tmp_path / "tokens")
    flags = ["--d_in", str(D_MODEL), "--d_sae", "64", "--k", "4", "--matryoshka_widths", "8", "64"]
    flags += ["--model_name", str(model), "--hook_name", HOOK]
    flags += ["--dataset_path", str(tmp_path / "tokens"), "--is_dataset_tokenized", "true"]
    flags += ["--context_size", str(CONTEXT), "--prepend_bos", "false"]
    flags += ["--training_tokens", str(64 * 20), "--train_batch_size_tokens", "64"]
    flags += ["--store_batch_size_prompts", "4", "--n_batches_in_buffer", "4"]
    flags += ["--n_eval_batches", "2", "--output_path", str(tmp_path / "output")]
    main(["train", *flags, "--log_to_wandb", "false"])
    out, err = capfd.readouterr()
    assert "saved to" in out
    # the model folder's loader (io.local_sources) drops it where it builds the model
    texts = _texts(recorded)
    assert not [noise for text in [*texts, out, err] for noise in _noise_in(text)]
    assert any(text.startswith("the dataset holds 1,024 tokens") for text in texts)
