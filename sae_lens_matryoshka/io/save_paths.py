"""Where a run saves, checked before anything loads; and a trained SAE kept when its save fails.

SAELens's runner loads the model and the dataset, trains for hours, then
writes the SAE to ``output_path``: an ``output_path`` that is a file, on a
read-only filesystem or on a full disk loses the whole run at its last
moment, and a bad ``checkpoint_path`` fails at the first checkpoint. For a
Matryoshka run the plugin wraps ``LanguageModelSAETrainingRunner.__init__`` so
that both paths are checked before it loads anything (:func:`check_save_path`:
a folder, or creatable inside a writable folder, with room for what goes
there), and ``save_final_sae`` so that when the final save fails anyway the
trained SAE is written to a fallback folder (:func:`fallback_folders`) and the
error says where, and so that a run that ends while diverging (see
``divergence``) saves nothing as if it had succeeded.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.util import str_to_dtype

from sae_lens_matryoshka.config import is_matryoshka
from sae_lens_matryoshka.divergence import TrainingDiverged

#: what a checkpoint holds per parameter besides the weights: Adam's two moments
_CHECKPOINT_COPIES = 3


def sae_bytes(cfg: Any) -> int:
    """The size of one saved SAE of ``cfg`` (encoder, decoder, biases, a threshold), in bytes."""
    itemsize = torch.empty(0, dtype=str_to_dtype(cfg.dtype)).element_size()
    return (2 * cfg.d_in * cfg.d_sae + 2 * cfg.d_sae + cfg.d_in) * itemsize


def check_save_path(path: str | Path, field: str, needed_bytes: int) -> None:
    """Refuse ``path`` (the config field ``field``) unless an SAE of ``needed_bytes`` can go there.

    It must be a folder, or not exist yet below a folder this process can
    write into, on a filesystem with at least ``needed_bytes`` free.
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    advice = f"Nothing was loaded or trained: choose another {field}."
    if path.exists() and not path.is_dir():
        raise ValueError(f"{field}={str(path)!r} is an existing file, not a folder. {advice}")
    if not existing.is_dir():
        raise ValueError(
            f"{field}={str(path)!r} cannot be created: {str(existing)!r} is a file, not a "
            f"folder. {advice}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{field}={str(path)!r}: this process cannot write into {str(existing)!r} "
            f"(read-only or not its folder). {advice}"
        )
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ValueError(
            f"{field}={str(path)!r}: its filesystem has {free / 2**20:,.0f} MiB free, and what is "
            f"saved there takes {needed_bytes / 2**20:,.0f} MiB. {advice}"
        )


def fallback_folders(output_path: str | Path) -> Iterator[Path]:
    """Where a trained SAE goes when ``output_path`` fails: the temp folder, home, here."""
    name = f"{Path(output_path).name or 'sae'}.unsaved-{time.strftime('%Y%m%d-%H%M%S')}"
    for base in (tempfile.gettempdir(), Path.home(), Path.cwd()):
        yield Path(base) / name


def check_runner_paths(cfg: Any) -> None:
    """Refuse a runner config's ``output_path`` or ``checkpoint_path`` (when it checkpoints).

    What the wrapped runner checks first; public for callers that load
    something themselves before building the runner (the CLI, with a local
    model folder).
    """
    size = sae_bytes(cfg.sae)
    if cfg.output_path is not None:
        check_save_path(cfg.output_path, "output_path", size)
    if cfg.checkpoint_path is not None and (cfg.n_checkpoints > 0 or cfg.save_final_checkpoint):
        check_save_path(cfg.checkpoint_path, "checkpoint_path", _CHECKPOINT_COPIES * size)


def install() -> None:
    """Check a Matryoshka run's save paths before it loads, and keep its SAE if saving fails.

    Wraps ``LanguageModelSAETrainingRunner.__init__`` and ``save_final_sae``;
    other runs go through SAELens's code as before. Idempotent.
    """
    runner = LanguageModelSAETrainingRunner
    if getattr(runner, "_matryoshka_save_paths", False):
        return
    init = runner.__init__
    save_final_sae = runner.save_final_sae

    @functools.wraps(init)
    def __init__(
        self: LanguageModelSAETrainingRunner[Any], cfg: Any, *args: Any, **kwargs: Any
    ) -> None:
        if is_matryoshka(cfg.sae):
            check_runner_paths(cfg)
        init(self, cfg, *args, **kwargs)

    @functools.wraps(save_final_sae)
    def save_final_sae_or_keep(
        self: LanguageModelSAETrainingRunner[Any],
        sae: Any,
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        if not is_matryoshka(self.cfg.sae):
            save_final_sae(self, sae, output_path, log_feature_sparsity)
            return
        watch = sae.divergence
        if watch.suspect:
            raise TrainingDiverged(
                f"Training ended while diverging: since step {watch.streak_start} the "
                f"reconstruction was worse than divergence_fvu={watch.fvu_limit:g} times the "
                f"mean's, so the SAE was not saved to output_path={output_path!r}; the last "
                "checkpoint is from before it. Lower the learning rate, or set "
                "divergence_patience=0 to save regardless."
            )
        try:
            save_final_sae(self, sae, output_path, log_feature_sparsity)
        except OSError as error:
            kept = _keep(self, save_final_sae, sae, output_path, log_feature_sparsity)
            raise OSError(
                f"Saving the trained SAE to output_path={output_path!r} failed ({error}). "
                + (
                    f"It was saved to {str(kept)!r} instead: SAE.load_from_disk({str(kept)!r}) "
                    "loads it; move the folder where it belongs."
                    if kept is not None
                    else "It could not be saved anywhere else either (the temp folder, home "
                    "and the working folder all failed); the runner's SAE is still in memory."
                )
            ) from error

    runner.__init__ = __init__
    runner.save_final_sae = save_final_sae_or_keep
    runner._matryoshka_save_paths = True


def _keep(
    runner: LanguageModelSAETrainingRunner[Any],
    save_final_sae: Any,
    sae: Any,
    output_path: str,
    log_feature_sparsity: torch.Tensor | None,
) -> Path | None:
    """The first fallback folder the SAE could be saved into, or None."""
    for folder in fallback_folders(output_path):
        try:
            save_final_sae(runner, sae, str(folder), log_feature_sparsity)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        return folder
    return None
