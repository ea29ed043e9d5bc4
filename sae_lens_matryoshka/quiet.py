"""A Matryoshka run's output: SAELens's known noise dropped, its misleading dataset warning made true.

A run through SAELens's ``LanguageModelSAETrainingRunner`` (from Python, or
``sae-lens-matryoshka train``, which builds the same runner) printed,
besides its progress bar and the plugin's summary, messages nobody running
it can act on, and one that misleads:

- SAELens's ``You just passed in a dataset/model which will override the one
  specified in your configuration ...`` (a ``sae_lens`` logger warning, on
  stderr when logging is not configured);
- torch's ``To copy construct from a tensor, it is recommended to use
  sourceTensor.detach().clone() ...`` ``UserWarning``, raised by SAELens's
  activation store on every pretokenized in-memory dataset;
- TransformerLens's ``HookedTransformer(.from_pretrained) is deprecated``
  ``DeprecationWarning`` when SAELens's runner loads the model itself
  (shown wherever deprecation warnings are: ``-W default``, test runners);
- SAELens's ``The training dataset contains fewer samples (64) than the
  number of samples required by your training configuration (2560)``,
  which counts the dataset's rows (sequences) against ``training_tokens``
  (tokens): a dataset of 400 sequences of 1024 tokens (409,600 tokens) was
  said to be short of a 20,000-token run.

For a Matryoshka run the plugin wraps the runner's ``__init__`` and ``run``
so that, inside them, exactly those messages are dropped (each matched by
the logger or module that raises it and its message, see
:data:`KNOWN_WARNINGS` and :class:`OverrideNotices`); any other warning,
SAELens's own included, shows as before. The dataset warning is replaced by
one that counts tokens (:func:`short_dataset_message`), given when ``run``
starts: by then a run under ``torchrun`` holds its own share of the data
(``distributed.launch.shard_activation_source``), which its per-rank
``training_tokens`` is measured against. Other SAEs' runs are left as
SAELens has them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

from datasets import Dataset
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

from sae_lens_matryoshka.config import is_matryoshka
from sae_lens_matryoshka.io.local_sources import HOOKED_TRANSFORMER_DEPRECATION

_ACTIVATIONS_STORE = r"sae_lens\.training\.activations_store\Z"

#: each warning dropped inside a Matryoshka run: (message pattern, category, module that raises it)
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # SAELens copies each pretokenized row with torch.tensor(row[:context_size]); the row is
    # a tensor of token ids (the store sets the dataset's format to torch), so the copy is
    # the one SAELens means and holds the same values either way: torch's advice is to
    # SAELens's code, and nothing a user sets changes it. (Older torch words it
    # "sourceTensor.clone().detach()".)
    (
        r"To copy construct from a tensor, it is recommended to use "
        r"sourceTensor\.(detach\(\)\.clone\(\)|clone\(\)\.detach\(\))",
        UserWarning,
        _ACTIVATIONS_STORE,
    ),
    # Counts sequences against tokens; ShortDatasetWarning says what is short, in tokens.
    (
        r"The training dataset contains fewer samples \(\d+\) than the number of samples "
        r"required by your training configuration \(\d+\)\.",
        UserWarning,
        _ACTIVATIONS_STORE,
    ),
    # SAELens's runner loads its model with HookedTransformer.from_pretrained_no_processing
    # and trains on HookedTransformer hooks: the advice to move to TransformerBridge is to
    # SAELens, not to anyone running it. Raised (and attributed) inside TransformerLens's
    # own module, so a HookedTransformer the user builds in their own code still warns.
    (
        HOOKED_TRANSFORMER_DEPRECATION,
        DeprecationWarning,
        r"transformer_lens\.HookedTransformer\Z",
    ),
)


class OverrideNotices(logging.Filter):
    """Drops SAELens's notices that a dataset or model passed to the runner overrides the config.

    Safe to drop: the caller passed that dataset or model in the very call
    the notice is about, so it only repeats the caller's own argument back;
    and ``sae-lens-matryoshka train`` passes what it loaded from the folders
    ``model_name`` and ``dataset_path`` name (``io.local_sources``), which
    the notice would wrongly call not reproducible from the config.
    """

    _NOTICE = re.compile(
        r"You just passed in a (dataset|model) which will override the one specified in your "
        r"configuration: .*\. As a consequence this run will not be reproducible via "
        r"configuration alone\.\Z",
        re.DOTALL,
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "sae_lens"
            and record.module == "llm_sae_training_runner"
            and self._NOTICE.match(record.getMessage()) is not None
        )


@contextlib.contextmanager
def known_noise_dropped() -> Iterator[None]:
    """Inside: :data:`KNOWN_WARNINGS` are ignored and ``sae_lens``'s logger drops :class:`OverrideNotices`."""
    sae_lens_logger, notices = logging.getLogger("sae_lens"), OverrideNotices()
    sae_lens_logger.addFilter(notices)
    try:
        with warnings.catch_warnings():
            for message, category, module in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message, category, module)
            yield
    finally:
        sae_lens_logger.removeFilter(notices)


class ShortDatasetWarning(UserWarning):
    """The dataset holds fewer tokens than ``training_tokens``: training passes over it more than once."""


def short_dataset_message(runner: LanguageModelSAETrainingRunner[Any]) -> str | None:
    """One line saying, in tokens, that ``runner``'s dataset is shorter than its run, or None.

    Only for a pretokenized in-memory dataset, whose tokens are its sequences
    times the positions the store trains on in each (``context_size``, or
    what ``seqpos_slice`` keeps of it). Text is tokenized as it is read and a
    streamed dataset has no length, so neither can be counted before
    training; for those, and for any dataset, SAELens still says "All
    samples in the training dataset have been exhausted, beginning new
    epoch." when a pass ends.
    """
    store = runner.activations_store
    if not isinstance(store.dataset, Dataset) or not store.is_dataset_tokenized:
        return None
    sequences, per_sequence = len(store.dataset), store.training_context_size
    tokens, training_tokens = sequences * per_sequence, runner.cfg.training_tokens
    if tokens >= training_tokens:
        return None
    return (
        f"the dataset holds {tokens:,} tokens ({sequences:,} sequences of {per_sequence}), "
        f"fewer than training_tokens={training_tokens:,}: training passes over it "
        f"{training_tokens / tokens:.3g} times. Give a larger dataset, or set training_tokens "
        f"to at most {tokens:,} for one pass."
    )


def install() -> None:
    """Drop the known noise inside a Matryoshka runner, and warn of a short dataset in tokens. Idempotent.

    Installed after the plugin's other runner wrappers, so that it is the
    outermost and its filters cover theirs too: ``run_record``'s summary reads
    further batches from the store after SAELens's ``run`` returns. A warning
    one of those wrappers raises with a ``stacklevel`` meant for the caller of
    ``run`` must count this wrapper's frame too.
    """
    runner = LanguageModelSAETrainingRunner
    if getattr(runner, "_matryoshka_quiet", False):
        return
    init = runner.__init__
    run = runner.run

    @functools.wraps(init)
    def __init__(
        self: LanguageModelSAETrainingRunner[Any], cfg: Any, *args: Any, **kwargs: Any
    ) -> None:
        if not is_matryoshka(cfg.sae):
            init(self, cfg, *args, **kwargs)
            return
        with known_noise_dropped():
            init(self, cfg, *args, **kwargs)

    @functools.wraps(run)
    def run_quietly(self: LanguageModelSAETrainingRunner[Any]) -> Any:
        if not is_matryoshka(self.cfg.sae):
            return run(self)
        message = short_dataset_message(self)
        if message is not None:
            warnings.warn(message, ShortDatasetWarning, stacklevel=2)
        with known_noise_dropped():
            return run(self)

    runner.__init__ = __init__
    runner.run = run_quietly
    runner._matryoshka_quiet = True
