"""The benchmarks run end to end at toy sizes and print one JSON object."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
BENCHMARK = BENCHMARKS / "step_time.py"


def test_step_time_benchmark_reports_every_contender_as_json() -> None:
    size = ["--d-in", "16", "--d-sae", "128", "--batch", "64", "--k", "4", "--repeats", "1"]
    options = ["--e2e-tokens", "4096", "--keep-freed-memory", "--json"]
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), *size, *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(completed.stdout)  # stdout holds the JSON object and nothing else
    assert result["allocator"] == "keeps freed memory"
    names = {
        "ours_matryoshka_5_levels",
        "ours_matryoshka_5_levels_dense",
        "ours_batchtopk_1_level",
        "ours_topk_1_level",
        "saelens_batchtopk",
        "saelens_topk",
        "saelens_matryoshka_batchtopk",
    }
    if importlib.util.find_spec("sparsify") is not None:  # the optional `bench` extra
        names.add("sparsify_topk")
    assert result["median_step_seconds"].keys() == names
    assert result["step_peak_memory_mib"].keys() == names
    assert all(seconds > 0 for seconds in result["median_step_seconds"].values())
    assert result["ours_step_time_ratio_to"].keys() == names - {"ours_matryoshka_5_levels"}
    assert result["size"]["matryoshka_widths"] == [4, 12, 28, 60, 128]
    rates = result["end_to_end_tokens_per_second"]
    assert rates.keys() == {"ours_matryoshka_5_levels", "saelens_matryoshka_batchtopk"}
    assert all(rate > 0 for rate in rates.values())


def test_eval_memory_benchmark_stays_below_one_cosine_matrix() -> None:
    """At 32,768 latents one full cosine matrix is 4 GiB; blocks of 256 MiB are used."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "eval_memory.py"), "--d-sae", "32768", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (row,) = json.loads(completed.stdout)["results"]
    assert row["d_sae"] == 32768
    assert row["full_matrix_mib"] == 4096
    assert 0 < row["peak_rise_mib"] < row["full_matrix_mib"] / 4
    assert -1 <= row["full_width_value"] <= 1
