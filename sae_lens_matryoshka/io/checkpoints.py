"""Checkpoints that are whole or absent, and refused when a file changes after writing.

SAELens's trainer writes a checkpoint's files one after another into the
checkpoint's final folder, and its runner adds its own files after that; a run
killed in between leaves a folder that looks like a checkpoint and is not one.
For Matryoshka SAEs, importing the plugin wraps SAELens's own checkpoint
routine (it is not copied): the routine writes into a staging folder beside
the target, a marker listing every file it wrote, its size and its SHA-256 is
added, and the folder is renamed into place in one step. A folder at a
checkpoint's final name is therefore always complete; one without a valid
marker is reported as incomplete, naming what is missing or empty and the
latest complete checkpoint beside it, by resuming, by
``MatryoshkaTrainingSAE.load_from_disk`` and by ``load_sae``.

Sizes catch a torn write, not a file changed in place: bytes flipped by a
disk, a copy or a hand edit left a checkpoint that loaded and resumed
silently with weights off by up to 1.4e3 (issue 25). The digests catch that.
Resuming checks every file's, a loader those of the files it reads
(``check_complete``'s ``read``: not the 2 GiB trainer state an SAE load never
opens), and a changed file is refused naming it, both digests and the latest
complete checkpoint beside it. A marker written before digests (sizes only)
is still accepted on its sizes. Each shard of a latent-sharded checkpoint
marks its own part (``shard-i-of-n``, its own files, hashed by the rank that
wrote them); the folder of the parts has no marker, and checking it checks
every part's sizes and digests.

Why SHA-256, hashed after SAELens has written the files
(``benchmarks/checksum_cost.py``, AMD EPYC Zen 3 with SHA instructions,
GiB per CPU second, one thread): OpenSSL's SHA-256 1.27, BLAKE2b 0.70,
SHA-512 0.66, MD5 0.59, BLAKE2s 0.38, SHA3-256 0.36; SHA-1 (1.39) is broken
and zlib's CRC-32 (2.65) is 32 bits, not a digest. ``sha256sum`` checks a
file by hand, and the Hub names LFS objects by it. The files are still in the
page cache when the marker is written: reading them back costs 0.08 CPU
seconds per GiB, a tenth of hashing them, and hashing afterwards hashes
several files at once in threads (hashlib releases the GIL). Hashing inside
the writes would save only that tenth: safetensors writes from Rust, out of
reach, and hashing ``torch.save``'s stream for the trainer state came out
within noise of hashing after it (8.5 and 9.6 CPU s in two runs, against 8.9
and 9.3), in the writing thread. At Gemma-2-2B size (1.13 GiB of
weights, 2.25 GiB of trainer state), marking adds 2.7 CPU seconds to a
10.4 CPU-second write, and verifying takes as long (4.0 from disk).

Verifying is the one place that reads a whole checkpoint: ``_digests``, used
by marking, by ``check_complete`` and by ``latest_complete``.
Resuming checks a folder twice (SAELens reads the trainer state, then the
weights), so a file's digest is remembered in this process by its identity,
size and change times, and only for a file unchanged for ``_RACY_NS`` before
it was hashed (git's "racily clean" rule: a write within the file system's
timestamp granularity could otherwise go unseen). ``latest_complete`` checks
sizes of every candidate and digests only of the one it returns, falling back
to the next when those do not match.

Resuming also corrects SAELens's step count. Its trainer saves a periodic
checkpoint before it counts the step the checkpoint ends, so a resumed run
would repeat that step's number and run one behind the uninterrupted run in
everything keyed to the step number: its sparsity windows, its logging steps
and the latent orderings (``latent_order``). The samples trained say how many
steps have run (``steps_completed``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka.config import trains_matryoshka

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
    from sae_lens_matryoshka.latent_part import LatentPart

#: the file that says a checkpoint folder is complete: every file, its size and its digest
MARKER = "checkpoint_complete.json"
#: the hash of the marker's digests, and the marker's key that holds them (see above for why)
DIGEST = "sha256"
#: how much of a file is read at a time (256 KiB hashes as fast, 8 MiB slower)
_CHUNK_BYTES = 2**20
#: a digest is remembered only for a file whose last change was this long before hashing began
_RACY_NS = 2 * 10**9
#: digests remembered by :func:`file_digest`: (device, inode, size, mtime, ctime) -> hex digest
_remembered: dict[tuple[int, ...], str] = {}
#: at most this many remembered digests (a few checkpoints' files)
_REMEMBER = 256
#: hex digits of a digest an error message shows
_SHORT = 16
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


class ChangedCheckpointError(IncompleteCheckpointError):
    """A file of a complete checkpoint no longer has the digest it was written with."""


def mark_complete(folder: str | Path) -> Path:
    """Write ``folder``'s completion marker: every file in it, its size and its SHA-256.

    The checkpoint routine calls this when SAELens has written everything
    (the files are hashed in parallel, from the page cache). Call it yourself
    only for a checkpoint you know to be whole that was written without the
    marker (by SAELens alone, or an earlier version), or whose files you
    changed on purpose: it records them as they are now.
    """
    folder = Path(folder)
    paths = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MARKER]
    names = [path.relative_to(folder).as_posix() for path in paths]
    sizes = {name: path.stat().st_size for name, path in zip(names, paths, strict=True)}
    digests = dict(zip(names, _digests(paths), strict=True))
    marker = folder / MARKER
    marker.write_text(json.dumps({"files": sizes, DIGEST: digests}, indent=1))
    return marker


def check_complete(folder: str | Path, read: Collection[str] | None = None) -> None:
    """Refuse ``folder`` unless it is a completely written checkpoint whose files are unchanged.

    Raises :class:`IncompleteCheckpointError` for a missing, empty or torn
    file (every file's size is checked), and :class:`ChangedCheckpointError`
    for a file whose SHA-256 is not the one its marker records. ``read``: the
    files the caller will read (names within the checkpoint, or within each
    shard's part), whose digests are checked; ``None`` checks every file's
    (resuming reads them all). A marker from before digests is checked on
    sizes alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist.")
    problems = _problems(folder)
    if problems:
        raise IncompleteCheckpointError(
            f"{folder} is not a complete checkpoint: {'; '.join(problems)}. {_latest_hint(folder)}"
        )
    changed = _changed(folder, read)
    if changed:
        raise ChangedCheckpointError(_changed_message(str(folder), changed, _latest_hint(folder)))


def check_digests(where: str, marker: str | Path, files: Mapping[str, str | Path]) -> None:
    """Refuse ``files`` (name in the marker -> where it is) unless each has its recorded digest.

    For a checkpoint's files found elsewhere than in its folder (a Hub
    download keeps each in its own blob); ``where`` names the checkpoint in
    the error. Files the marker does not list, and a marker without digests,
    pass.
    """
    record = _read_marker(Path(marker))
    if isinstance(record, str):
        raise IncompleteCheckpointError(f"{where}: {record}.")
    digests = record.get(DIGEST) or {}
    expected = {name: digests[name] for name in files if name in digests}
    changed = _compare({name: Path(files[name]) for name in expected}, expected)
    if changed:
        hint = "Download it again (force_download=True), or load another checkpoint."
        raise ChangedCheckpointError(_changed_message(where, changed, hint))


def file_digest(path: str | Path) -> str:
    """``path``'s SHA-256, in hex, remembered while the file is unchanged (see the module).

    Read in 1 MiB pieces rather than with ``hashlib.file_digest`` (Python
    3.11+; the same speed). A file last changed less than ``_RACY_NS``
    before hashing began is hashed again next time: a change within the file
    system's timestamp granularity would leave its size and times as they were.
    """
    key = _identity(path)
    remembered = _remembered.get(key)
    if remembered is not None:
        return remembered
    started = time.time_ns()
    digest = hashlib.new(DIGEST)
    buffer = memoryview(bytearray(_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(buffer[:count])
    hex_digest = digest.hexdigest()
    if key[-1] + _RACY_NS < started and _identity(path) == key:
        if len(_remembered) >= _REMEMBER:
            del _remembered[next(iter(_remembered))]
        _remembered[key] = hex_digest
    return hex_digest


def _identity(path: str | Path) -> tuple[int, ...]:
    """What tells a file changed: device, inode, size, mtime, and the later of mtime and ctime."""
    stat = os.stat(path)
    changed = max(stat.st_mtime_ns, stat.st_ctime_ns)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, changed)


def _digests(paths: Sequence[Path]) -> list[str]:
    """Each file's :func:`file_digest`, several at once (hashlib releases the GIL), largest first."""
    if len(paths) < 2:
        return [file_digest(path) for path in paths]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    largest_first = sorted(paths, key=lambda path: -path.stat().st_size)
    with ThreadPoolExecutor(min(len(paths), cpus or 1)) as pool:
        found = dict(zip(largest_first, pool.map(file_digest, largest_first), strict=True))
    return [found[path] for path in paths]


def _compare(paths: Mapping[str, Path], expected: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(name, expected, found) for each file whose digest is not the expected one."""
    names = sorted(expected)
    found = _digests([paths[name] for name in names])
    return [
        (name, expected[name], digest)
        for name, digest in zip(names, found, strict=True)
        if digest != expected[name]
    ]


def _changed(folder: Path, read: Collection[str] | None) -> list[tuple[str, str, str]]:
    """(name, expected, found) for each changed file of complete checkpoint ``folder`` (see check_complete)."""
    marked = [(f"{part.name}/", part) for part in sorted(_parts(folder))] or [("", folder)]
    expected: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for prefix, marked_folder in marked:
        record = _read_marker(marked_folder)
        assert isinstance(record, dict)  # _problems has read it
        for name, digest in (record.get(DIGEST) or {}).items():
            if read is None or name in read:
                expected[prefix + name] = digest
                paths[prefix + name] = marked_folder / name
    return _compare(paths, expected)


def _changed_message(where: str, changed: list[tuple[str, str, str]], hint: str) -> str:
    files = "; ".join(
        f"{name}'s {DIGEST} is {found[:_SHORT]}... where {expected[:_SHORT]}... was written"
        for name, expected, found in changed
    )
    return (
        f"{where} changed after it was written: {files}. The disk or a copy damaged the "
        f"file, or it was edited; loading it would give other values than the run wrote. {hint} "
        "(If you changed it on purpose and know the checkpoint is whole, "
        "`sae_lens_matryoshka.io.checkpoints.mark_complete(folder)` records the files as "
        "they are now.)"
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


def latest_complete(checkpoints: str | Path, skip: Path | None = None) -> Path | None:
    """The complete checkpoint with the most training samples among ``checkpoints``' folders.

    Every folder's sizes are checked, and only the digests of the one
    returned: one whose files changed is passed over for the next. ``skip``:
    a folder not to consider (the one an error is about).
    """
    complete = [
        folder
        for folder in Path(checkpoints).iterdir()
        if folder.is_dir()
        and folder != skip
        and not _STAGING.search(folder.name)
        and not _problems(folder)
    ]
    for folder in sorted(complete, key=_progress, reverse=True):
        if not _changed(folder, None):
            return folder
    return None


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
    if not (folder / MARKER).is_file():
        found = [_describe(folder, name) for name in _TRAINER_FILES]
        return [
            f"it has no {MARKER} (written by a run killed while writing it, or without the "
            "marker by SAELens alone or an earlier version; `sae_lens_matryoshka.io.checkpoints."
            "mark_complete(folder)` marks one you know to be whole)",
            *[problem for problem in found if problem],
        ]
    record = _read_marker(folder)
    if isinstance(record, str):
        return [record]
    files = record["files"]
    return [problem for name, size in files.items() if (problem := _describe(folder, name, size))]


def _read_marker(path: Path) -> dict[str, Any] | str:
    """The marker of checkpoint folder ``path`` (or the marker file ``path``), or what is wrong with it."""
    marker = path / MARKER if path.is_dir() else path
    try:
        record = json.loads(marker.read_text())
        files, digests = record["files"], record.get(DIGEST)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its {MARKER} is damaged ({error})"
    valid_files = isinstance(files, dict) and all(
        isinstance(size, int) and not isinstance(size, bool) for size in files.values()
    )
    valid_digests = digests is None or (
        isinstance(digests, dict)
        and digests.keys() == files.keys()
        and all(isinstance(digest, str) for digest in digests.values())
    )
    if not (valid_files and valid_digests):
        return f"its {MARKER} is damaged (not a size and a {DIGEST} digest for each file)"
    return dict(record)


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
    if _PART.match(folder.name) and not _STAGING.search(folder.parent.name):
        folder = folder.parent  # one shard's part: the checkpoint is the folder of the parts
    parent = folder.parent.parent if _STAGING.search(folder.parent.name) else folder.parent
    latest = latest_complete(parent, skip=folder) if parent.is_dir() else None
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


def steps_completed(trainer: SAETrainer[Any, Any]) -> int:
    """The steps a resumed trainer has completed: its samples over its batch size.

    SAELens's saved ``n_training_steps`` is one short for a checkpoint taken
    during training (see the module's docstring). Every step trains one full
    batch, so the samples count the steps; when they are not a whole number
    of batches (the batch size changed between the runs), the saved count is
    kept.
    """
    steps, rest = divmod(trainer.n_training_samples, trainer.cfg.train_batch_size_samples)
    return trainer.n_training_steps if rest else steps


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
        if not trains_matryoshka(self):
            load(self, checkpoint_path)
            return
        check_complete(checkpoint_path)
        load(self, checkpoint_path)
        self.n_training_steps = steps_completed(self)

    SAETrainer.save_checkpoint = save_checkpoint
    SAETrainer.load_trainer_state = load_trainer_state
    SAETrainer._matryoshka_checkpoints = True
