"""The one table ``benchmarks/gpu_check.sh`` ends with: its tests, step benchmarks and soak.

Reads what the script left in its results folder (``tests.xml`` from pytest,
``step_<precision>_dead<fraction>.json`` from ``step_time.py --json``,
``soak.json`` from ``soak.py --json``) and prints one Markdown table, ready to
paste. A part that left no result (it crashed: its ``.log`` says why) is a
row saying so, and makes the exit status non-zero.

    python benchmarks/gpu_table.py RESULTS_FOLDER
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

Row = tuple[str, str, str]


def cuda_test_rows(folder: Path) -> list[Row]:
    """pytest's counts, from its JUnit XML report."""
    report = folder / "tests.xml"
    if not report.exists():
        return [("CUDA tests", "pytest -m cuda", "MISSING: see tests.log")]
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result = f"{passed} passed, {counts['failures'] + counts['errors']} failed"
    return [("CUDA tests", "pytest -m cuda", f"{result}, {counts['skipped']} skipped")]


def step_rows(folder: Path) -> list[Row]:
    """One row per contender of every step benchmark: time, peak memory, ours / this."""
    rows: list[Row] = []
    results = [json.loads(path.read_text()) for path in folder.glob("step_*.json")]
    for result in sorted(
        results, key=lambda result: (result["precision"], result["dead_fraction"])
    ):
        setting = f"{result['precision']}, {result['dead_fraction']:.0%} dead"
        seconds = result.get("median_step_seconds", {})
        memory = result.get("step_peak_memory_mib", {})
        ratios = result.get("ours_step_time_ratio_to", {})
        to_floor = result.get("step_time_ratio_to_floor", {})
        if "floor_step_seconds" in result:
            floor_ms = f"{result['floor_step_seconds'] * 1000:.1f} ms/step"
            rows.append((f"step, {setting}", "floor (GEMM + Adam)", floor_ms))
        for name in {**seconds, **memory}:
            parts = []
            if name in seconds:
                parts.append(f"{seconds[name] * 1000:.1f} ms/step")
            if name in to_floor:
                parts.append(f"{to_floor[name]:.2f}x floor")
            if name in memory:
                parts.append(f"{memory[name]:.0f} MiB step peak")
            if name in ratios:
                parts.append(f"ours / this {ratios[name]:.2f}x")
            rows.append((f"step, {setting}", name, ", ".join(parts)))
        for target in result.get("targets", []):
            verdict = "met" if target["met"] else "MISSED"
            bound = f"ours / {target['of']} at most {target['at_most']:.1f}x"
            rows.append((f"target, {setting}", bound, f"{target['ratio']:.2f}x, {verdict}"))
        if result.get("kernel_choices"):
            rows.append((f"kernels, {setting}", "", json.dumps(result["kernel_choices"])))
    expected = sorted(path.stem for path in folder.glob("step_*.log"))
    for missing in sorted(set(expected) - {path.stem for path in folder.glob("step_*.json")}):
        rows.append((f"step, {missing}", "", f"MISSING: see {missing}.log"))
    return rows


def soak_rows(folder: Path) -> list[Row]:
    """The memory samples of the soak and its verdict."""
    path = folder / "soak.json"
    if not path.exists():
        return [("soak", "", "MISSING: see soak.log")]
    soak = json.loads(path.read_text())
    rows: list[Row] = []
    for step, sample in soak["memory_samples"]:
        memory = [f"{sample['resident_mib']:.0f} MiB resident"]
        if "cuda_max_allocated_mib" in sample:
            memory.insert(0, f"max_memory_allocated {sample['cuda_max_allocated_mib']:.1f} MiB")
            memory.insert(1, f"allocated {sample['cuda_allocated_mib']:.1f} MiB")
        rows.append((f"soak, {soak['device']}", f"step {step}", ", ".join(memory)))
    verdict = "flat" if soak["flat"] else "GROWING"
    rows.append(
        (
            f"soak, {soak['device']}",
            f"{soak['steps']} steps, {soak['steps_per_second']:.0f} steps/s",
            f"{soak['trend_of']} {soak['growth_after_warm_up_mib']:+.1f} MiB after warm-up: "
            f"{verdict}",
        )
    )
    return rows


def header(folder: Path) -> str:
    """The machine, torch and size, from the first step benchmark."""
    for path in sorted(folder.glob("step_*.json")):
        result: dict[str, Any] = json.loads(path.read_text())
        size = result["size"]
        return (
            f"{result['machine']}, torch {result['torch']}: d_in={size['d_in']}, "
            f"d_sae={size['d_sae']}, {size['batch']} tokens, k={size['k']}, "
            f"{result['warmup_steps']} warm-up steps, median of {result['repeats']}"
        )
    return "no step benchmark finished"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    rows = cuda_test_rows(folder) + step_rows(folder) + soak_rows(folder)
    print(header(folder))
    print()
    print("| check | setting | result |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")
    sys.exit(1 if any("MISSING" in row[2] for row in rows) else 0)


if __name__ == "__main__":
    main()
