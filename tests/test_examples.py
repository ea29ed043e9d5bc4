"""The example scripts stay runnable."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens import SAE

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAEConfig

from .conftest import assert_readme_shows, run_torchrun

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_offline_example_trains_and_reports_every_level(tmp_path: Path) -> None:
    """Its default run (about 16 s); what it prints is the README's sample output."""
    output = tmp_path / "offline"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_offline.py"), "--output-dir", str(output)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines[-4:]] == [32, 96, 224, 512]
    assert isinstance(SAE.load_from_disk(output), MatryoshkaSAE)
    printed = "\n".join(lines[-6:]).replace(str(output), "matryoshka_offline")
    assert_readme_shows("saved to matryoshka_offline", printed, abs_tol=0.002, rel_tol=0.02)


def test_hub_example_config_is_valid_without_downloading(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "train_tiny_stories", EXAMPLES / "train_tiny_stories.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.build_config(tmp_path, training_tokens=1_000_000, device="cpu", log_to_wandb=False)
    assert isinstance(cfg.sae, MatryoshkaTrainingSAEConfig)
    assert cfg.sae.matryoshka_widths == [512, 1536, 3584, 7680, 16384]


def test_hub_example_without_the_hub_says_so_in_one_line(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_tiny_stories.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "empty_cache"), "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("Could not reach the Hugging Face Hub (")
    assert last.endswith("or run this example with --offline.")


@pytest.mark.slow
def test_toy_variants_example_prints_every_variant() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "toy_variants.py"), "--steps", "40"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = result.stdout.strip().splitlines()[1:]
    assert len(rows) == 7
    assert rows[-1].startswith("SAELens batchtopk (control)")
    for row in rows:
        score = float(row.split()[-1])
        assert 0.0 <= score <= 1.0


def test_levels_and_sharing_example_runs_offline(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "levels_and_sharing.py"),
            "--output-dir",
            str(tmp_path),
            "--steps",
            "50",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "plugin-free copy: JumpReLUSAE" in result.stdout
    assert "levels (prefix widths): [6, 16, 32]" in result.stdout
    assert isinstance(SAE.load_from_disk(tmp_path / "matryoshka"), MatryoshkaSAE)


def test_real_model_example_runs_offline_and_plots_levels(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_tiny_stories.py"),
            "--offline",
            "--output-dir",
            str(tmp_path),
            "--training-tokens",
            "30000",
            "--eval-batches",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = json.loads((tmp_path / "levels.json").read_text())
    assert [row["width"] for row in rows] == [16, 48, 112, 240, 512]
    assert (tmp_path / "levels.png").read_bytes()[:4] == b"\x89PNG"
    assert len(result.stdout.strip().splitlines()) == 6


@pytest.mark.parametrize("latent_shards", [1, 2])
@pytest.mark.slow
def test_distributed_example_runs_under_torchrun(tmp_path: Path, latent_shards: int) -> None:
    script = [str(EXAMPLES / "train_data_parallel.py"), "--output-dir", str(tmp_path / "dp")]
    flags = ["--training-tokens", "10240", "--latent-shards", str(latent_shards)]
    result = run_torchrun([*script, *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 rank(s) ({latent_shards} latent shard(s) each replica) trained one SAE" in (
        result.stdout
    )
    sae = SAE.load_from_disk(tmp_path / "dp")
    assert isinstance(sae, MatryoshkaSAE) and sae.W_dec.shape == (512, 64)


def test_default_outputs_are_git_ignored_and_removed_by_make_clean() -> None:
    sources = [*EXAMPLES.glob("*.py"), ROOT / "sae_lens_matryoshka" / "cli.py"]
    defaults = {
        folder
        for source in sources
        for folder in re.findall(
            r'"--output-dir",[^)]*?default=(?:Path\()?"([\w.]+)"', source.read_text(), re.DOTALL
        )
    }
    assert {"matryoshka_toy", "matryoshka_offline", "matryoshka_tiny_stories"} <= defaults
    if (ROOT / ".git").exists():
        for folder in defaults:
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/cfg.json"], cwd=ROOT)
            assert ignored.returncode == 0, f"{folder} is not git-ignored"
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", "clean"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    removed = shlex.split(recipe)
    assert removed[:2] == ["rm", "-rf"]
    for folder in defaults:
        assert any(fnmatch.fnmatch(f"{folder}/", pattern) for pattern in removed), folder
