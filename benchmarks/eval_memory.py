"""Peak memory of the decoder-geometry eval at real dictionary sizes, in bounded blocks.

``mean_max_decoder_cosine`` (SAEBench's ``average_max_decoder_cosine_sim``)
compares every latent's decoder with every other's. Built as one
``d_sae x d_sae`` matrix that is 17 GB at 65,536 latents and 275 GB at
262,144; computed a block of rows at a time (``evals.level_max_decoder_cosines``)
it needs one block. This measures, in a fresh process per size, the rise of
the peak resident set while every level's value is computed (the paper's five
levels), and the time it takes.

    python benchmarks/eval_memory.py                 # d_sae 65536 and 262144, d_in 64
    python benchmarks/eval_memory.py --d-sae 65536 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch
from tiny_runs import process_memory_mib

from sae_lens_matryoshka.evals import level_max_decoder_cosines


def paper_widths(d_sae: int) -> list[int]:
    return [d_sae // 32, 3 * d_sae // 32, 7 * d_sae // 32, 15 * d_sae // 32, d_sae]


def probe(d_sae: int, d_in: int) -> dict[str, float]:
    """In this process: the peak memory rise and time of every level's mean max cosine."""
    W_dec = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = process_memory_mib("VmRSS")
    start = time.perf_counter()
    values = level_max_decoder_cosines(W_dec, paper_widths(d_sae))
    seconds = time.perf_counter() - start
    return {
        "d_sae": d_sae,
        "d_in": d_in,
        "peak_rise_mib": process_memory_mib("VmHWM") - before,
        "full_matrix_mib": d_sae * d_sae * 4 / 2**20,
        "seconds": seconds,
        "full_width_value": values[-1],
    }


def measure(d_sae: int, d_in: int) -> dict[str, Any]:
    # freed blocks go back to the OS at once, so the resident set tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, "--probe", "--d-sae", str(d_sae), "--d-in", str(d_in)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-sae", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.d_sae[0], args.d_in)))
        return
    results = [measure(d_sae, args.d_in) for d_sae in args.d_sae]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": results}))
        return
    print(f"{'d_sae':>8} {'d_in':>5} {'peak rise MiB':>14} {'one matrix MiB':>15} {'seconds':>8}")
    for row in results:
        print(
            f"{row['d_sae']:>8} {row['d_in']:>5} {row['peak_rise_mib']:>14.0f} "
            f"{row['full_matrix_mib']:>15.0f} {row['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
