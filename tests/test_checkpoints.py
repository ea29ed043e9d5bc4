"""Checkpoints are whole or refused: written aside, marked complete, renamed into place.

Unit tests of the marker and the checks, SAELens's own trainer writing through
the wrapped routine, and real runs killed with SIGKILL at random moments and
in the middle of checkpoint writes: no incomplete checkpoint is ever loaded or
resumed, every one is refused naming what is missing and the latest complete
checkpoint, and resuming from the latest complete one ends at the weights of
an uninterrupted run. A complete checkpoint whose bytes change afterwards (its
size unchanged) is refused by its SHA-256 digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, load_sae
from sae_lens_matryoshka.io import checkpoints
from sae_lens_matryoshka.io.checkpoints import (
    MARKER,
    ChangedCheckpointError,
    IncompleteCheckpointError,
    check_complete,
    latest_complete,
    mark_complete,
)
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import flip_bytes, record_hashed_files

D_IN, D_SAE, BATCH, STEPS, N_CHECKPOINTS = 10, 48, 32, 30, 5

#: one training run, importable by the killed children and by this test alike
RUN = f'''
import dataclasses, sys, time
import torch
from sae_lens.training.sae_trainer import SAETrainer
from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.toy import short_run_trainer_config

D_IN, D_SAE, BATCH, STEPS, N_CHECKPOINTS = {D_IN}, {D_SAE}, {BATCH}, {STEPS}, {N_CHECKPOINTS}


def batches(start_sample):
    """Batch i depends only on i, so a resumed run continues where it left off."""
    generator = torch.Generator().manual_seed(7)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    step = start_sample // BATCH
    while True:
        batch_rng = torch.Generator().manual_seed(1000 + step)
        codes = torch.rand(BATCH, D_SAE, generator=batch_rng) < 0.06
        yield codes.float() @ directions + 0.05 * torch.randn(BATCH, D_IN, generator=batch_rng)
        step += 1


def sae(seed):
    torch.manual_seed(seed)
    return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=3, matryoshka_widths=[6, 18, D_SAE], use_matryoshka_aux_loss=True))


def trainer(model, start_sample, checkpoints):
    cfg = dataclasses.replace(
        short_run_trainer_config(STEPS, batch_size=BATCH, lr=3e-3, dead_feature_window=4),
        n_checkpoints=N_CHECKPOINTS if checkpoints else 0,
        checkpoint_path=checkpoints,
    )
    return SAETrainer(cfg=cfg, sae=model, data_provider=batches(start_sample))
'''

#: the killed child: slow checkpoint writes (so that kills land inside them), announced
CHILD = (
    RUN
    + """
save_model, save_state = MatryoshkaTrainingSAE.save_model, SAETrainer.save_trainer_state

def slow_save_model(self, path):
    print("WRITING", flush=True)
    time.sleep(0.15)
    return save_model(self, path)

def slow_save_state(self, path):
    time.sleep(0.15)
    save_state(self, path)
    time.sleep(0.15)

MatryoshkaTrainingSAE.save_model = slow_save_model
SAETrainer.save_trainer_state = slow_save_state
print("READY", flush=True)
model = sae(0)
trainer(model, 0, sys.argv[1]).fit()
torch.save(model.state_dict(), sys.argv[2])
print("DONE", flush=True)
"""
)


def _namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(RUN, namespace)
    return namespace


def _folder_with_files(folder: Path, **sizes: int) -> Path:
    folder.mkdir(parents=True)
    for name, size in sizes.items():
        (folder / name.replace("__", ".")).write_bytes(b"x" * size)
    return folder


def test_the_marker_lists_every_file_and_its_size(tmp_path: Path) -> None:
    folder = _folder_with_files(
        tmp_path / "256", cfg__json=10, sae_weights__safetensors=100, trainer_state__pt=50
    )
    mark_complete(folder)
    check_complete(folder)
    (folder / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(
        IncompleteCheckpointError, match=r"trainer_state\.pt has 0 bytes where 50 were written"
    ):
        check_complete(folder)
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"sae_weights\.safetensors is missing"):
        check_complete(folder)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_marker_records_each_files_sha256_and_a_changed_byte_is_refused(
    tmp_path: Path,
) -> None:
    older = _folder_with_files(tmp_path / "128", cfg__json=10, sae_weights__safetensors=64)
    mark_complete(older)
    folder = _folder_with_files(
        tmp_path / "256", cfg__json=10, sae_weights__safetensors=100, trainer_state__pt=50
    )
    (folder / "sae_weights.safetensors").write_bytes(bytes(range(100)))
    record = json.loads(mark_complete(folder).read_text())
    assert record["files"]["trainer_state.pt"] == 50
    assert record["sha256"] == {name: _sha256(folder / name) for name in record["files"]}
    check_complete(folder)
    written = record["sha256"]["trainer_state.pt"]
    flip_bytes(folder / "trainer_state.pt", count=1)  # same size: only the digest can tell
    found = _sha256(folder / "trainer_state.pt")
    with pytest.raises(ChangedCheckpointError) as error:
        check_complete(folder)
    message = str(error.value)
    assert message.startswith(f"{folder} changed after it was written: trainer_state.pt's sha256")
    assert f"is {found[:16]}... where {written[:16]}... was written" in message
    assert f"The latest complete checkpoint beside it is {older}" in message
    assert "mark_complete(folder)" in message
    assert isinstance(error.value, IncompleteCheckpointError)  # caught where torn ones are
    check_complete(folder, read=["cfg.json", "sae_weights.safetensors"])  # not read: passes
    assert latest_complete(tmp_path) == older
    mark_complete(folder)  # changed on purpose: recorded as it is now
    check_complete(folder)


def test_a_marker_without_digests_is_checked_on_sizes_as_before(tmp_path: Path) -> None:
    """Checkpoints an earlier version marked (sizes only) stay loadable and resumable."""
    folder = _folder_with_files(tmp_path / "256", cfg__json=10, trainer_state__pt=50)
    marker = mark_complete(folder)
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({"files": record["files"]}))
    check_complete(folder)
    assert latest_complete(tmp_path) == folder
    (folder / "trainer_state.pt").write_bytes(b"y" * 49)
    with pytest.raises(IncompleteCheckpointError, match="has 49 bytes where 50 were written"):
        check_complete(folder)


@pytest.mark.parametrize(
    "damage",
    [
        {"sha256": {"cfg.json": "00"}},  # a file without a digest
        {"sha256": {"cfg.json": 1, "trainer_state.pt": "00"}},
        {"sha256": ["00", "00"]},
        {"files": {"cfg.json": "10", "trainer_state.pt": 50}},
    ],
)
def test_a_damaged_digest_table_is_a_damaged_marker(tmp_path: Path, damage: dict[str, Any]) -> None:
    folder = _folder_with_files(tmp_path / "256", cfg__json=10, trainer_state__pt=50)
    marker = mark_complete(folder)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), **damage}))
    with pytest.raises(IncompleteCheckpointError, match=f"its {MARKER} is damaged"):
        check_complete(folder)


def test_latest_complete_hashes_only_the_checkpoint_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scanning many checkpoints reads sizes; digests only of the chosen one, then the next."""
    for samples in (128, 256, 384):
        mark_complete(_folder_with_files(tmp_path / str(samples), cfg__json=3, trainer_state__pt=9))
    flip_bytes(tmp_path / "384" / "trainer_state.pt")
    hashed = record_hashed_files(monkeypatch)
    assert latest_complete(tmp_path) == tmp_path / "256"
    assert sorted({path.parent.name for path in hashed}) == ["256", "384"]
    assert len(hashed) == 4  # two files each, once


def test_a_digest_is_remembered_only_while_its_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming checks a checkpoint twice (trainer state, then weights) and hashes it once.

    A file changed less than ``_RACY_NS`` before hashing is hashed each time
    (the file system's timestamps may not yet tell a change); here the margin
    is lifted to test remembering at all.
    """
    folder = _folder_with_files(tmp_path / "256", cfg__json=3, trainer_state__pt=9)
    mark_complete(folder)
    hashed = record_hashed_files(monkeypatch)
    check_complete(folder)
    check_complete(folder)
    assert len(hashed) == 4  # just written: racy, so hashed again
    monkeypatch.setattr(checkpoints, "_RACY_NS", -(10**15))
    hashed.clear()
    for _ in range(3):
        check_complete(folder)
    assert len(hashed) == 2
    state = folder / "trainer_state.pt"
    before = state.stat().st_mtime_ns
    flip_bytes(state)
    os.utime(state, ns=(before + 10**9, before + 10**9))
    with pytest.raises(ChangedCheckpointError, match=r"trainer_state\.pt's sha256"):
        check_complete(folder)
    assert [path.name for path in hashed[2:]] == ["trainer_state.pt"]


def test_a_latent_sharded_checkpoints_parts_carry_their_own_digests(tmp_path: Path) -> None:
    """Each shard marks its own part (the parts' folder has no marker); both checks cover them."""
    older = tmp_path / "128"
    for shard in range(2):
        mark_complete(_folder_with_files(older / f"shard-{shard}-of-2", cfg__json=3, x__pt=5))
    checkpoint = tmp_path / "256"
    for shard in range(2):
        part = _folder_with_files(checkpoint / f"shard-{shard}-of-2", cfg__json=3)
        (part / "sae_weights.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}      " + bytes(32))
        mark_complete(part)
    check_complete(checkpoint)
    flip_bytes(checkpoint / "shard-1-of-2" / "sae_weights.safetensors")
    with pytest.raises(
        ChangedCheckpointError,
        match=rf"{checkpoint} changed .*: shard-1-of-2/sae_weights\.safetensors's sha256",
    ):
        check_complete(checkpoint)
    check_complete(checkpoint / "shard-0-of-2")  # resuming rank 0 reads its part alone
    with pytest.raises(ChangedCheckpointError) as error:
        check_complete(checkpoint / "shard-1-of-2")
    message = str(error.value)
    assert ": sae_weights.safetensors's sha256" in message
    # beside the checkpoint, not the other shard's part of the same one
    assert f"The latest complete checkpoint beside it is {older}." in message
    assert latest_complete(tmp_path) == older


def test_a_folder_without_marker_is_incomplete_and_names_the_latest_complete(
    tmp_path: Path,
) -> None:
    for samples in (128, 256):
        mark_complete(_folder_with_files(tmp_path / str(samples), cfg__json=3, trainer_state__pt=4))
    half = _folder_with_files(tmp_path / "384", cfg__json=3, trainer_state__pt=0)
    with pytest.raises(IncompleteCheckpointError) as error:
        check_complete(half)
    message = str(error.value)
    assert f"no {MARKER}" in message and "trainer_state.pt is empty" in message
    assert "sae_weights.safetensors is missing" in message
    assert f"The latest complete checkpoint beside it is {tmp_path / '256'}" in message
    assert latest_complete(tmp_path) == tmp_path / "256"
    staged = _folder_with_files(tmp_path / ".512.incomplete-0a1b" / "512", cfg__json=3)
    mark_complete(staged)  # even with a marker, a staging folder is not a checkpoint
    with pytest.raises(IncompleteCheckpointError, match=r"staging folder.*is .*/256"):
        check_complete(staged)


def test_saelens_trainer_writes_through_staging_and_marks_completion(tmp_path: Path) -> None:
    run = _namespace()
    trainer = run["trainer"](run["sae"](0), 0, str(tmp_path))
    trainer.fit()
    trainer.save_checkpoint("again")  # the same name twice replaces the older one
    trainer.save_checkpoint("again")
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert not [name for name in folders if "incomplete" in name or "replaced" in name]
    assert len(folders) == N_CHECKPOINTS + 1
    for name in folders:
        check_complete(tmp_path / name)
        loaded = MatryoshkaTrainingSAE.load_from_disk(tmp_path / name)
        assert loaded.matryoshka_widths == [6, 18, D_SAE]
        assert isinstance(load_sae(tmp_path / name), torch.nn.Module)


def test_resuming_from_a_damaged_checkpoint_names_the_damage(tmp_path: Path) -> None:
    """A 0-byte trainer state is reported as such, not as a missing scaler file."""
    run = _namespace()
    run["trainer"](run["sae"](0), 0, str(tmp_path)).fit()
    latest = latest_complete(tmp_path)
    assert latest is not None
    (latest / "trainer_state.pt").write_bytes(b"")
    resumed = run["trainer"](run["sae"](1), int(latest.name), None)
    with pytest.raises(IncompleteCheckpointError, match=r"trainer_state\.pt has 0 bytes"):
        resumed.load_trainer_state(latest)
    with pytest.raises(IncompleteCheckpointError, match=r"trainer_state\.pt has 0 bytes"):
        resumed.sae.load_weights_from_checkpoint(latest)
    with pytest.raises(IncompleteCheckpointError):
        MatryoshkaTrainingSAE.load_from_disk(latest)


def test_a_checkpoint_changed_after_writing_is_refused_by_resuming_and_loading(
    tmp_path: Path,
) -> None:
    """Bytes flipped inside a complete checkpoint (size unchanged) used to resume silently."""
    run = _namespace()
    run["trainer"](run["sae"](0), 0, str(tmp_path)).fit()
    latest = latest_complete(tmp_path)
    assert latest is not None
    resumed = run["trainer"](run["sae"](1), int(latest.name), None)
    for name in ("sae_weights.safetensors", "trainer_state.pt"):
        original = (latest / name).read_bytes()
        flip_bytes(latest / name)
        pattern = rf"{latest} changed after it was written: {name.replace('.', '[.]')}'s sha256"
        with pytest.raises(ChangedCheckpointError, match=pattern):
            resumed.load_trainer_state(latest)
        with pytest.raises(ChangedCheckpointError, match=pattern):
            resumed.sae.load_weights_from_checkpoint(latest)
        assert latest_complete(tmp_path) not in (latest, None)
        if name == "trainer_state.pt":  # loading the SAE alone does not read it
            assert isinstance(load_sae(latest), torch.nn.Module)
        else:
            for loader in (MatryoshkaTrainingSAE.load_from_disk, load_sae):
                with pytest.raises(ChangedCheckpointError, match=pattern):
                    loader(latest)
        (latest / name).write_bytes(original)
    resumed.load_trainer_state(latest)  # as written: resumes
    resumed.sae.load_weights_from_checkpoint(latest)


def _run_and_kill(folder: Path, during_write: bool, rng: random.Random) -> str:
    """Start a training run and SIGKILL it: inside a checkpoint write, or at a random moment."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            str(folder / "ckpt"),
            str(folder / "final.pt"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    writes_to_skip = rng.randrange(N_CHECKPOINTS) if during_write else None
    if during_write:
        for line in child.stdout:
            if line.strip() == "WRITING":
                if writes_to_skip == 0:
                    break
                writes_to_skip -= 1
        delay = rng.uniform(0.0, 0.4)  # within the slowed write
    else:
        delay = rng.uniform(0.2, 3.0)
    try:
        child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    return "finished" if child.returncode == 0 else "killed"


@pytest.mark.slow
def test_runs_killed_at_random_moments_leave_no_checkpoint_that_loads_half_written(
    tmp_path: Path,
) -> None:
    rng = random.Random(0)
    outcomes, staged = [], 0
    for attempt in range(6):
        folder = tmp_path / f"run{attempt}"
        folder.mkdir()
        outcomes.append(_run_and_kill(folder, during_write=attempt % 2 == 0, rng=rng))
        checkpoints = folder / "ckpt"
        if not checkpoints.exists():
            continue
        for path in sorted(checkpoints.iterdir()):
            if "incomplete" in path.name:
                staged += 1
                for written in path.iterdir():
                    with pytest.raises(IncompleteCheckpointError, match="staging folder"):
                        check_complete(written)
                    with pytest.raises(IncompleteCheckpointError):
                        MatryoshkaTrainingSAE.load_from_disk(written)
                continue
            check_complete(path)  # at a final name, always whole
            loaded = MatryoshkaTrainingSAE.load_from_disk(path)
            assert all(torch.isfinite(t).all() for t in loaded.state_dict().values())
    assert "killed" in outcomes
    assert staged >= 1, "no kill landed inside a checkpoint write"

    # resume the last killed run from its latest complete checkpoint
    run = _namespace()
    killed = [tmp_path / f"run{i}" for i, outcome in enumerate(outcomes) if outcome == "killed"]
    resumable = [folder for folder in killed if (folder / "ckpt").exists()]
    resumable = [folder for folder in resumable if latest_complete(folder / "ckpt") is not None]
    assert resumable
    latest = latest_complete(resumable[-1] / "ckpt")
    assert latest is not None
    model = run["sae"](123)  # other initial weights: everything must come from the checkpoint
    trainer = run["trainer"](model, int(latest.name), None)
    trainer.load_trainer_state(latest)
    model.load_weights_from_checkpoint(latest)
    trainer.fit()
    reference = run["sae"](0)
    reference_trainer = run["trainer"](reference, 0, None)
    reference_trainer.fit()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_only_matryoshka_checkpoints_change(tmp_path: Path) -> None:
    """Other SAEs keep SAELens's plain checkpoints (no staging, no marker)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    cfg = dataclasses.replace(
        short_run_trainer_config(2, batch_size=BATCH, lr=1e-3, dead_feature_window=4),
        checkpoint_path=str(tmp_path),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter([torch.randn(BATCH, D_IN)] * 2))
    trainer.save_checkpoint("plain")
    assert sorted(path.name for path in (tmp_path / "plain").iterdir()) == sorted(
        [
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
            "trainer_state.pt",
            "activation_scaler.json",
        ]
    )
