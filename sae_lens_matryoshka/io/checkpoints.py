"""Checkpoints that are whole or absent: written aside, marked complete, renamed into place.

SAELens's trainer writes a checkpoint's files one after another into the
checkpoint's final folder, and its runner adds its own files after that; a run
killed in between leaves a folder that looks like a checkpoint and is not one.
For Matryoshka SAEs, importing the plugin wraps SAELens's own checkpoint
routine (it is not copied): the routine writes into a staging folder beside
the target, a marker listing every file it wrote and its size is added, and
the folder is renamed into place in one step. A folder at a checkpoint's
final name is therefore always complete; one without a valid marker is
reported as incomplete, naming what is missing or empty and the latest
complete checkpoint beside it, by resuming, by
``MatryoshkaTrainingSAE.load_from_disk`` and by ``load_sae``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka.config import trains_matryoshka

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
    from sae_lens_matryoshka.latent_part import LatentPart

#: the file that says a checkpoint folder is complete: every file and its size
MARKER = "checkpoint_complete.json"
#: where a checkpoint is written before it is complete: ``.<name>.incomplete-<id>/<name>``
_STAGING = re.compile(r"\.incomplete-[0-9a-f]+$")
#: the files SAELens's trainer writes into every checkpoint
_TRAINER_FILES = ("cfg.json", "sae_weights.safetensors", "trainer_state.pt")
#: what a resumed run must share with its checkpoint (d_in and d_sae are checked by shape)
_MUST_MATCH_ON_RESUME = ("matryoshka_widths", "activation", "k", "prefix_sampling")
#: in each shard's part of a latent-sharded checkpoint: which latents it holds
PART_FILE = "latent_shard.json"
#: the folders of a latent-sharded checkpoint's parts
_PART = re.compile(r"^shard-(\d+)-of-(\d+)$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder was not completely written (its run was killed while writing it)."""


def mark_complete(folder: str | Path) -> Path:
    """Write ``folder``'s completion marker: every file in it and its size.

    The checkpoint routine calls this when SAELens has written everything.
    Call it yourself only for a checkpoint you know to be whole that was
    written without the marker (by SAELens alone, or an earlier version).
    """
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER
    }
    marker = folder / MARKER
    marker.write_text(json.dumps({"files": files}, indent=1))
    return marker


def check_complete(folder: str | Path) -> None:
    """Raise :class:`IncompleteCheckpointError` unless ``folder`` is a completely written checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist.")
    problems = _problems(folder)
    if problems:
        raise IncompleteCheckpointError(
            f"{folder} is not a complete checkpoint: {'; '.join(problems)}. {_latest_hint(folder)}"
        )


def check_resumable(folder: str | Path, cfg: MatryoshkaTrainingSAEConfig, part: LatentPart) -> None:
    """Refuse to resume from ``folder`` unless it is complete, of the same SAE, and of ``part``.

    What resuming checks before it loads any weight (``d_in`` and ``d_sae``
    are checked by the weights' shapes).
    """
    check_complete(folder)
    check_part(folder, part.checkpoint_record())
    saved = json.loads((Path(folder) / SAE_CFG_FILENAME).read_text())
    differences = [
        f"{name}: checkpoint {saved.get(name)!r}, this run {getattr(cfg, name)!r}"
        for name in _MUST_MATCH_ON_RESUME
        if saved.get(name) != getattr(cfg, name)
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {folder}: it trained another SAE "
            f"({'; '.join(differences)}). Resume with the checkpoint's settings."
        )


def check_part(folder: str | Path, part: dict[str, Any] | None) -> None:
    """Refuse a checkpoint folder that holds another part of the dictionary than ``part``.

    ``part`` is what this process trains (its SAE's
    ``latent_part.checkpoint_record()``; ``None``: the whole dictionary); each
    part of a latent-sharded checkpoint records its own.
    """
    record = Path(folder) / PART_FILE
    saved = json.loads(record.read_text()) if record.is_file() else None
    if saved == part:
        return
    held = _describe_part(saved) + (" (it was not sharded)" if saved is None else "")
    raise ValueError(
        f"{folder} holds {held}, but this process trains {_describe_part(part)}: resume with "
        "the checkpoint's number of latent shards."
    )


def _describe_part(part: dict[str, Any] | None) -> str:
    if part is None:
        return "the whole dictionary"
    return f"shard {part['shard']} of {part['n_shards']} (latents {part['latents']})"


def is_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is (or was being written as) a training checkpoint, not a saved SAE."""
    return written_by_plugin(folder) or (Path(folder) / "trainer_state.pt").exists()


def written_by_plugin(folder: str | Path) -> bool:
    """Whether ``folder`` is a checkpoint this plugin wrote or was writing.

    Only this module makes staging folders, completion markers and
    latent-shard parts, so they mark a Matryoshka checkpoint even when its
    ``cfg.json`` is missing or damaged.
    """
    folder = Path(folder).resolve()
    staged = any(_STAGING.search(part) for part in folder.parts)
    return staged or (folder / MARKER).exists() or bool(_parts(folder))


def latest_complete(checkpoints: str | Path) -> Path | None:
    """The complete checkpoint with the most training samples among ``checkpoints``' folders."""
    complete = [
        folder
        for folder in Path(checkpoints).iterdir()
        if folder.is_dir() and not _STAGING.search(folder.name) and not _problems(folder)
    ]
    return max(complete, key=_progress, default=None)


def _parts(folder: Path) -> list[Path]:
    """The shards' parts in ``folder``, if it is a latent-sharded checkpoint."""
    if not folder.is_dir():
        return []
    return [part for part in folder.iterdir() if part.is_dir() and _PART.match(part.name)]


def _problems(folder: Path) -> list[str]:
    if _STAGING.search(folder.parent.name) or _STAGING.search(folder.name):
        return ["it is a staging folder, left by a run killed while writing it"]
    parts = _parts(folder)
    if parts:  # whole when every shard's part is
        match = _PART.match(parts[0].name)
        assert match is not None
        n_shards = int(match.group(2))
        expected = [f"shard-{shard}-of-{n_shards}" for shard in range(n_shards)]
        problems = [f"{name} is missing" for name in expected if not (folder / name).is_dir()]
        for part in sorted(parts):
            problems += [f"{part.name}: {problem}" for problem in _problems(part)]
        return problems
    marker = folder / MARKER
    if not marker.is_file():
        found = [_describe(folder, name) for name in _TRAINER_FILES]
        return [
            f"it has no {MARKER} (written by a run killed while writing it, or without the "
            "marker by SAELens alone or an earlier version; `sae_lens_matryoshka.io.checkpoints."
            "mark_complete(folder)` marks one you know to be whole)",
            *[problem for problem in found if problem],
        ]
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"its {MARKER} is damaged ({error})"]
    return [problem for name, size in files.items() if (problem := _describe(folder, name, size))]


def _describe(folder: Path, name: str, size: int | None = None) -> str | None:
    """What is wrong with file ``name`` (of ``size`` bytes, if known), or None."""
    path = folder / name
    if not path.exists():
        return f"{name} is missing"
    if not path.is_file():
        return f"{name} is not a regular file"
    actual = path.stat().st_size
    if size is None:
        return f"{name} is empty" if actual == 0 else None
    if actual != size:
        return f"{name} has {actual} bytes where {size} were written"
    return None


def _progress(folder: Path) -> tuple[int, float]:
    """Sort key: the sample count in the folder's name (SAELens names them so), then age."""
    digits = re.findall(r"\d+", folder.name)
    return (int(digits[-1]) if digits else -1, folder.stat().st_mtime)


def _latest_hint(folder: Path) -> str:
    parent = folder.parent.parent if _STAGING.search(folder.parent.name) else folder.parent
    latest = latest_complete(parent) if parent.is_dir() else None
    if latest is None:
        return f"No complete checkpoint was found beside it in {parent}."
    return f"The latest complete checkpoint beside it is {latest}."


def _publish(written: Path, target: Path) -> None:
    """Mark ``written`` complete and rename it to ``target`` (replacing an older one)."""
    mark_complete(written)
    replaced = None
    if target.exists():
        replaced = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        target.rename(replaced)
    os.replace(written, target)
    if replaced is not None:
        shutil.rmtree(replaced)


def install() -> None:
    """Make SAELens's trainer write and read Matryoshka checkpoints as described above.

    Wraps ``SAETrainer.save_checkpoint`` and ``SAETrainer.load_trainer_state``
    (the first thing a resume reads); both behave as before for other SAEs.
    Idempotent.
    """
    if getattr(SAETrainer, "_matryoshka_checkpoints", False):
        return
    save = SAETrainer.save_checkpoint
    load = SAETrainer.load_trainer_state

    @functools.wraps(save)
    def save_checkpoint(
        self: SAETrainer[Any, Any],
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None or not trains_matryoshka(self):
            save(self, checkpoint_name, base_path, wandb_aliases)
            return
        if self.sae.divergence.suspect:  # keep the last checkpoint from before it
            watch = self.sae.divergence
            warnings.warn(
                f"checkpoint {checkpoint_name!r} not written: since step {watch.streak_start} "
                f"the run's reconstruction is worse than divergence_fvu={watch.fvu_limit:g} "
                "times the mean's, so the run may be diverging (see sae_lens_matryoshka."
                "divergence); the previous checkpoint is kept as the latest.",
                stacklevel=2,
            )
            return
        part = self.sae.latent_part.checkpoint_record()
        if part is not None:  # one shard's part, beside the other shards' parts
            base, checkpoint_name = Path(base) / checkpoint_name, part["name"]
        staging = Path(base) / f".{checkpoint_name}.incomplete-{uuid.uuid4().hex[:8]}"
        save(self, checkpoint_name, staging, wandb_aliases)
        if part is not None:
            (staging / checkpoint_name / PART_FILE).write_text(json.dumps(part))
        _publish(staging / checkpoint_name, Path(base) / checkpoint_name)
        staging.rmdir()

    @functools.wraps(load)
    def load_trainer_state(self: SAETrainer[Any, Any], checkpoint_path: Path | str) -> None:
        if trains_matryoshka(self):
            check_complete(checkpoint_path)
        load(self, checkpoint_path)

    SAETrainer.save_checkpoint = save_checkpoint
    SAETrainer.load_trainer_state = load_trainer_state
    SAETrainer._matryoshka_checkpoints = True
