"""The toy demo: what it writes, from the function and from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sae_lens_matryoshka.cli import main
from sae_lens_matryoshka.toy_demo import run_toy_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_metrics_and_figures(tmp_path: Path, capsys) -> None:
    metrics = run_toy_demo(output_dir=tmp_path, steps=60)
    assert {p.name for p in tmp_path.iterdir()} == {
        "metrics.json",
        "decoder_cosines.png",
        "parent_child_activations.png",
    }
    for png in ("decoder_cosines.png", "parent_child_activations.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["matryoshka"]["absorption"] == metrics["matryoshka"]["absorption"]
    for name in ("matryoshka", "batchtopk"):
        assert 0 <= saved[name]["absorption"] <= 1
        assert 0 <= saved[name]["mcc"] <= 1
        assert len(saved[name]["absorption_edges"]) == 9
        assert len(saved[name]["best_cosine"]) == 16
    assert [row["width"] for row in saved["matryoshka"]["levels"]] == [3, 12, 16]
    printed = capsys.readouterr().out
    assert "absorption" in printed and "matryoshka explained variance per level: 3:" in printed


def test_toy_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_lens_matryoshka",
            "toy",
            "--steps",
            "30",
            "--seed",
            "1",
            "--width",
            "20",
            "--l0",
            "1.0",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "wrote" in result.stdout
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["toy"]["seed"] == 1 and saved["toy"]["steps"] == 30
    assert [row["width"] for row in saved["matryoshka"]["levels"]] == [3, 12, 20]
    assert "Training SAE" in result.stderr  # SAELens's progress bar


def test_toy_refuses_unknown_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["toy", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
