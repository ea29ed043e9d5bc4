"""A local record of every Matryoshka run, without wandb: metrics as JSON lines, a figure, a summary.

SAELens keeps a run's losses and metrics only in wandb: without it nothing
is left of training but the weights, and ``runner.run()`` says nothing of
how the result turned out. For a Matryoshka run the plugin wraps
``LanguageModelSAETrainingRunner.run`` so that it leaves

- ``training_log.jsonl`` (:data:`RECORD_FILENAME`): one JSON object per
  line, flushed as written. A ``"start"`` line (the run's settings), then a
  ``"step"`` line every ``logger.wandb_log_frequency`` steps holding exactly
  what SAELens logs to wandb on that step (``losses/...``,
  ``metrics/explained_variance``, ``metrics/l0``, each level's
  ``metrics/level_<width>/mse`` and ``.../explained_variance``,
  ``sparsity/dead_features``, the learning rate, ...) under SAELens's own
  names, ``step`` being wandb's step (the trainer's 0-based step index); and
  a ``"summary"`` line at the end (below). Non-finite numbers are written as
  ``null``, so every line is strict JSON;
- ``loss_curve.png`` (:data:`FIGURE_FILENAME`): the losses and each level's
  explained variance against the step, drawn from that file at the end;
- a summary, printed when the config is ``verbose`` (SAELens's default) as
  the command line printed it: where the SAE, its checkpoints and its record
  went, and each level's explained variance, L0 and dead latents on
  ``n_eval_batches`` further batches of the dataset (``evals.evaluate_levels``),
  also written as the record's last line; and a :class:`DeadLatentsWarning`
  when more than half of a level's latents never fired on them.

Where. While the run trains, in its checkpoint folder when it writes
checkpoints (SAELens appends a fresh run id to ``checkpoint_path``, so each
run has its own, and a run that dies leaves its record beside the
checkpoints it can resume from; a resumed run's record starts with the steps
its checkpoint had reached), else in a temporary folder. Once the SAE is
saved, both files are copied beside it into ``output_path``, where the user
looks and what is kept or shared: an ``output_path`` holds an SAE and the
record of the run that trained it, written together, never the record of a
rerun still training or one that failed (a failed run's warning names its
temporary record). A run with neither an ``output_path`` nor checkpoints
asked to keep nothing on disk: no record is computed, and only the summary
is printed.

Cost: SAELens computes its logging dict only on wandb logging steps, and
only with wandb on; the record makes every ``wandb_log_frequency``-th step
such a step without wandb as well (``SAETrainer._is_logging_step``), and
takes the dict SAELens builds (``build_train_step_log_dict``, wrapped), so a
step that is not recorded reads nothing more from the device than before,
and with wandb on the dict is built once for both. Under ``torchrun`` rank 0
alone records; a latent-sharded run, whose rank 0 holds one shard, records
nothing and says so.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import sae_lens
import torch
import torch.distributed as dist
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka.config import is_matryoshka, trains_matryoshka
from sae_lens_matryoshka.evals import evaluate_levels, evaluate_levels_on_activations
from sae_lens_matryoshka.kernels import measured

RECORD_FILENAME = "training_log.jsonl"
FIGURE_FILENAME = "loss_curve.png"
#: a level with more than this fraction of its latents dead is warned about
DEAD_FRACTION = 0.5
_PROG = "sae-lens-matryoshka"
_LOG = logging.getLogger(__name__)


class DeadLatentsWarning(UserWarning):
    """More than half of a level's latents never fired on the summary's evaluated tokens."""


class RunRecord:
    """The open ``training_log.jsonl`` of one run: one flushed JSON object per line."""

    def __init__(self, path: Path, append: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        #: the ``"step"`` entries written (whether a failed run left anything worth keeping)
        self.n_steps = 0
        self._file: IO[str] | None = path.open("a" if append else "w", encoding="utf-8")

    def write(self, entry: Mapping[str, Any]) -> None:
        """Append ``entry`` as one line (non-finite numbers as ``null``) and flush it."""
        if self._file is None:
            raise ValueError(f"the run record {self.path} is closed.")
        self._file.write(json.dumps(_strict(entry), allow_nan=False) + "\n")
        self._file.flush()
        self.n_steps += entry.get("event") == "step"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


#: the record of each SAE a runner is training now (the trainer finds it through its SAE)
_RECORDS: weakref.WeakKeyDictionary[Any, RunRecord] = weakref.WeakKeyDictionary()


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def checkpoint_folder(cfg: Any) -> Path | None:
    """The run's own checkpoint folder, if it writes checkpoints."""
    if cfg.checkpoint_path is not None and (cfg.n_checkpoints > 0 or cfg.save_final_checkpoint):
        return Path(cfg.checkpoint_path)
    return None


def record_folder(cfg: Any) -> Path | None:
    """Where a finished run's record is kept: ``output_path``, else its checkpoint folder."""
    if cfg.output_path is not None:
        return Path(cfg.output_path)
    return checkpoint_folder(cfg)


def level_table(rows: Sequence[Mapping[str, float]]) -> str:
    """Each level's width, explained variance, L0 and dead latents, as aligned text."""
    lines = [f"{'width':>10} {'explained variance':>19} {'L0':>9} {'dead latents':>13}"]
    lines += [
        f"{int(row['width']):>10} {row['explained_variance']:>19.4f} {row['l0']:>9.2f} "
        f"{int(row['dead_latents']):>13}"
        for row in rows
    ]
    return "\n".join(lines)


def mostly_dead(rows: Sequence[Mapping[str, float]]) -> str | None:
    """A warning's text naming the levels with more than half their latents dead, or None."""
    dead = [row for row in rows if row["dead_latents"] > DEAD_FRACTION * row["width"]]
    if not dead:
        return None
    levels = "; ".join(
        f"width {int(row['width'])}: {int(row['dead_latents'])} of {int(row['width'])} "
        f"({row['dead_latents'] / row['width']:.0%})"
        for row in dead
    )
    return (
        f"More than half of the latents are dead (never fired on the evaluated tokens) at {levels}. "
        "Usual causes: too few training tokens for this many latents (train longer, or use a "
        "smaller d_sae), a learning rate too high, or too few evaluated tokens to see rare "
        "latents fire (raise n_eval_batches)."
    )


def summarize(runner: LanguageModelSAETrainingRunner[Any], sae: Any) -> list[dict[str, float]]:
    """Each level of the trained ``sae`` on ``n_eval_batches`` further batches of the dataset.

    What the command line printed after a run (it now comes from here, for
    Python runs as well): ``evals.evaluate_levels`` without the CE loss; for a
    run from cached activations, which never loads its model,
    ``evals.evaluate_levels_on_activations`` on further cached batches.
    """
    cfg = runner.cfg
    if cfg.use_cached_activations:  # the model never ran and is not to run now
        store = runner.activations_store
        batches = [store.next_batch() for _ in range(cfg.n_eval_batches)]
        return evaluate_levels_on_activations(sae, batches)
    return evaluate_levels(
        sae,
        runner.model,
        runner.activations_store,
        n_batches=cfg.n_eval_batches,
        batch_size_prompts=_eval_batch_size(runner),
        compute_ce_loss=False,
    )


def _eval_batch_size(runner: LanguageModelSAETrainingRunner[Any]) -> int:
    return runner.cfg.eval_batch_size_prompts or runner.activations_store.store_batch_size_prompts


def report(
    runner: LanguageModelSAETrainingRunner[Any],
    rows: Sequence[Mapping[str, float]] | None,
    record: Path | None,
) -> str:
    """What a finished run prints: where the SAE, checkpoints and ``record`` went, then ``rows``."""
    cfg = runner.cfg
    lines = []
    output = None if cfg.output_path is None else Path(cfg.output_path)
    beside = record is not None and output is not None and record.parent == output
    if output is None:
        lines.append(f"{_PROG}: not saved (output_path is None).")
    else:
        also = f" ({RECORD_FILENAME} and {FIGURE_FILENAME} beside it)" if beside else ""
        lines.append(f"{_PROG}: saved to {output.resolve()}{also}")
    checkpoints = checkpoint_folder(cfg)
    if checkpoints is not None:
        lines.append(f"{_PROG}: checkpoints in {checkpoints.resolve()}")
    if record is not None and not beside:
        lines.append(f"{_PROG}: training record in {record.resolve()}")
    if rows is not None:
        per_batch = (
            cfg.train_batch_size_tokens  # a cached batch (summarize)
            if cfg.use_cached_activations
            else _eval_batch_size(runner) * runner.activations_store.context_size
        )
        tokens = cfg.n_eval_batches * per_batch
        lines.append(
            f"each level, on {cfg.n_eval_batches} further batches of the dataset "
            f"({tokens:,} tokens):"
        )
        lines.append(level_table(rows))
    return "\n".join(lines)


def read_record(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a ``training_log.jsonl``, in order (a torn last line is skipped)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # the line a killed run was writing
    return entries


def plot_record(record: str | Path, figure: str | Path) -> Path:
    """Draw ``record``'s losses and each level's explained variance against the step to ``figure``.

    Steps a resumed run recorded again replace the earlier ones. Drawn on a
    bare ``Figure`` (no pyplot), so no GUI backend is chosen or needed.
    """
    from matplotlib.figure import Figure

    by_step: dict[int, dict[str, Any]] = {}
    for entry in read_record(record):
        if entry.get("event") == "step":
            by_step[int(entry["step"])] = entry
    steps = sorted(by_step)
    entries = [by_step[step] for step in steps]
    names = sorted({name for entry in entries for name in entry})
    # the total first, drawn heavier: the terms below it add up to it
    losses = sorted(
        (name for name in names if name.startswith("losses/")),
        key=lambda name: name != "losses/overall_loss",
    )
    levels = sorted(
        (name for name in names if name.startswith("metrics/level_")),
        key=lambda name: int(name.split("/")[1].removeprefix("level_")),
    )
    variances = [name for name in levels if name.endswith("/explained_variance")]

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_axis, variance_axis = fig.subplots(1, 2)
    for name in losses:
        values = [_positive_or_nan(entry.get(name)) for entry in entries]
        if any(math.isfinite(value) for value in values):
            total = name == "losses/overall_loss"
            loss_axis.plot(
                steps,
                values,
                label=name.removeprefix("losses/"),
                color="black" if total else None,
                linewidth=2 if total else 1.2,
            )
    loss_axis.set_yscale("log")
    loss_axis.set_title("losses")
    for name in variances:
        values = [_number_or_nan(entry.get(name)) for entry in entries]
        width = name.split("/")[1].removeprefix("level_")
        variance_axis.plot(steps, values, label=f"width {width}")
    variance_axis.set_title("explained variance of each level (training batches)")
    for axis in (loss_axis, variance_axis):
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    if not steps:
        loss_axis.text(0.5, 0.5, "no step recorded", ha="center", transform=loss_axis.transAxes)
    fig.savefig(figure, dpi=110)
    return Path(figure)


def _number_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _positive_or_nan(value: Any) -> float:
    number = _number_or_nan(value)
    return number if number > 0 else math.nan  # a log axis shows no zero


def _start_entry(cfg: Any) -> dict[str, Any]:
    sae_cfg = cfg.sae
    return {
        "event": "start",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "resumed_from": cfg.resume_from_checkpoint,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "d_in": sae_cfg.d_in,
        "d_sae": sae_cfg.d_sae,
        "matryoshka_widths": list(sae_cfg.matryoshka_widths),
        "activation": sae_cfg.activation,
        "k": sae_cfg.k,
        "prefix_sampling": sae_cfg.prefix_sampling,
        "training_tokens": cfg.training_tokens,
        "train_batch_size_tokens": cfg.train_batch_size_tokens,
        "log_every_steps": cfg.logger.wandb_log_frequency,
        "sae_lens_version": sae_lens.__version__,
        "torch_version": torch.__version__,
    }


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _record_of(trainer: SAETrainer[Any, Any]) -> RunRecord | None:
    return _RECORDS.get(trainer.sae) if trains_matryoshka(trainer) else None


def _carry_over(record: RunRecord, checkpoint: str | Path) -> None:
    """Copy the steps the resumed ``checkpoint`` had reached from its run's record, if kept."""
    earlier = Path(checkpoint).parent / RECORD_FILENAME
    digits = "".join(char for char in Path(checkpoint).name if char.isdigit())
    if not earlier.is_file() or not digits:
        return
    reached = int(digits)  # SAELens names a checkpoint by its training samples
    for entry in read_record(earlier):
        if entry.get("event") == "step" and entry.get("details/n_training_samples", 0) <= reached:
            record.write(entry)


#: ``stacklevel`` of a warning given in :func:`_run_recorded`, so that it names the line
#: that called ``run()``: this function, this module's wrapper of ``run`` and ``quiet``'s
#: (the outermost) stand between
RUN_CALLER = 4


def _run_recorded(runner: LanguageModelSAETrainingRunner[Any], run: Any) -> Any:
    """``run(runner)`` (SAELens's ``run``), recorded, summarised and reported on this rank."""
    cfg = runner.cfg
    checkpoints = checkpoint_folder(cfg)
    temporary = None
    if checkpoints is None and cfg.output_path is not None:
        temporary = Path(tempfile.mkdtemp(prefix="sae_lens_matryoshka-record-"))
    live = checkpoints or temporary
    record = None
    if live is not None:
        record = RunRecord(live / RECORD_FILENAME, append=False)
        record.write(_start_entry(cfg))
        if cfg.resume_from_checkpoint is not None:
            _carry_over(record, cfg.resume_from_checkpoint)
            record.n_steps = 0  # counts this run's own steps
        _LOG.info("recording the run in %s", record.path)
        _RECORDS[runner.sae] = record
    try:
        sae = run(runner)
    except BaseException:
        if temporary is not None and record is not None and record.n_steps == 0:
            shutil.rmtree(temporary, ignore_errors=True)  # stopped before a step: nothing to keep
        elif temporary is not None:
            warnings.warn(
                "the run ended with an error before its record could join the SAE in "
                f"output_path; its training record up to there is in {temporary / RECORD_FILENAME}.",
                stacklevel=RUN_CALLER,
            )
        raise
    finally:
        _RECORDS.pop(runner.sae, None)
        if record is not None:
            record.close()

    # the SAE is trained and saved: nothing below may cost the caller its SAE
    try:
        rows: list[dict[str, float]] | None = summarize(runner, sae)
    except Exception as error:
        rows = None
        warnings.warn(
            f"the end-of-run level summary failed ({type(error).__name__}: {error}); the SAE is "
            "trained and saved as usual.",
            stacklevel=RUN_CALLER,
        )
    kept = None
    if record is not None:
        kept = _finish_record(record.path, rows, cfg.output_path, temporary)
    if cfg.verbose:
        print(report(runner, rows, kept), flush=True)
    warning = mostly_dead(rows) if rows is not None else None
    if warning is not None:  # last: a warning filter may make it an error
        warnings.warn(warning, DeadLatentsWarning, stacklevel=RUN_CALLER)
    return sae


def _finish_record(
    path: Path,
    rows: list[dict[str, float]] | None,
    output_path: str | None,
    temporary: Path | None,
) -> Path:
    """Close ``path``'s record with the summary, draw it, copy both beside the SAE; where it is."""
    with RunRecord(path, append=True) as record:
        record.write({"event": "summary", "levels": rows, "kernels": measured.choices()})
    figure = path.parent / FIGURE_FILENAME
    try:
        plot_record(path, figure)
    except Exception as error:  # a figure must not cost a trained SAE
        warnings.warn(
            f"the loss curve could not be drawn ({type(error).__name__}: {error}); the record "
            f"is in {path}.",
            stacklevel=RUN_CALLER + 1,
        )
    if output_path is None:
        return path
    try:
        for written in (path, figure):
            if written.exists():
                shutil.copyfile(written, Path(output_path) / written.name)
    except OSError as error:
        warnings.warn(
            f"the training record could not be copied beside the SAE into {output_path!r} "
            f"({error}); it is in {path}.",
            stacklevel=RUN_CALLER + 1,
        )
        return path
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)
    return Path(output_path) / RECORD_FILENAME


def install() -> None:
    """Record every Matryoshka run locally (see the module docstring). Idempotent."""
    if getattr(SAETrainer, "_matryoshka_run_record", False):
        return
    is_logging_step = SAETrainer._is_logging_step
    train_step = SAETrainer._train_step
    build_log = SAETrainer.build_train_step_log_dict
    run = LanguageModelSAETrainingRunner.run

    @functools.wraps(is_logging_step)
    def _is_logging_step(self: SAETrainer[Any, Any]) -> bool:
        logger = self.cfg.logger
        if not logger.log_to_wandb and _record_of(self) is not None:
            return (self.n_training_steps + 1) % logger.wandb_log_frequency == 0
        return is_logging_step(self)

    @functools.wraps(train_step)
    def _train_step(self: SAETrainer[Any, Any], *args: Any, **kwargs: Any) -> TrainStepOutput:
        output = train_step(self, *args, **kwargs)
        # with wandb on, SAELens builds the dict itself right after the step
        recorded = _record_of(self) is not None
        if recorded and not self.cfg.logger.log_to_wandb and self._is_logging_step():
            self.build_train_step_log_dict(output, self.n_training_samples)
        return output

    @functools.wraps(build_log)
    def build_train_step_log_dict(
        self: SAETrainer[Any, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        log = build_log(self, *args, **kwargs)
        record = _record_of(self)
        if record is not None:
            record.write({"event": "step", "step": self.n_training_steps, **log})
        return log

    @functools.wraps(run)
    def run_recorded(self: LanguageModelSAETrainingRunner[Any]) -> Any:
        if not is_matryoshka(self.cfg.sae) or _rank() != 0:
            return run(self)
        if not self.sae.latent_part.is_whole:  # (a Matryoshka SAE's, checked above)
            sae = run(self)
            # said whatever ``verbose`` is: it is why the run ends without its usual summary
            print(
                f"{_PROG}: this rank holds one latent shard, so the run keeps no record and "
                "evaluates no level; evaluate the saved SAE's levels with "
                "sae_lens_matryoshka.evals.evaluate_levels where it fits.",
                flush=True,
            )
            return sae
        return _run_recorded(self, run)

    SAETrainer._is_logging_step = _is_logging_step
    SAETrainer._train_step = _train_step
    SAETrainer.build_train_step_log_dict = build_train_step_log_dict
    LanguageModelSAETrainingRunner.run = run_recorded
    SAETrainer._matryoshka_run_record = True
