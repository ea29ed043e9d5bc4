"""Time and peak memory of the feature-tree search at 65,536 latents, on synthetic sparse codes.

``hierarchy.find_hierarchy`` counts co-firing per child for a bounded set of
candidate parents, never a ``d_sae x d_sae`` matrix (16 GiB of int32 counts at
65,536 latents). This streams synthetic codes through the same counter
(``hierarchy.hierarchy_from_codes``) in a fresh process and reports the rise of
the peak resident set, the counting time (code generation excluded), and
whether the planted tree comes back:

- levels: the paper's five, ``d_sae * [1/32, 3/32, 7/32, 15/32, 1]``;
- each first-level latent is a parent firing with probability 0.005 and has 4
  mutually exclusive children in the next levels (0.15 each);
- every token also fires ``--noise`` random latents outside the planted tree
  (default 30): about 40 active latents per token in all.

    python benchmarks/hierarchy_scale.py                  # d_sae 65536, 50 batches of 4096 tokens
    python benchmarks/hierarchy_scale.py --d-sae 4096 --batches 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tiny_runs import process_memory_mib

from sae_lens_matryoshka.hierarchy import hierarchy_from_codes

CHILDREN = 4
PARENT_PROBABILITY = 0.005
CHILD_PROBABILITY = 0.15


def paper_widths(d_sae: int) -> list[int]:
    return [d_sae // 32, 3 * d_sae // 32, 7 * d_sae // 32, 15 * d_sae // 32, d_sae]


def planted_edges(d_sae: int) -> set[tuple[int, int]]:
    parents = d_sae // 32
    return {(p, parents + CHILDREN * p + j) for p in range(parents) for j in range(CHILDREN)}


def synthetic_batches(
    d_sae: int, n_batches: int, batch: int, noise: int, timer: dict[str, float]
) -> Iterator[torch.Tensor]:
    """Sparse COO codes ``[batch, d_sae]`` with the planted tree; generation time goes to ``timer``."""
    generator = torch.Generator().manual_seed(0)
    parents = d_sae // 32
    for _ in range(n_batches):
        start = time.perf_counter()
        tokens, parent = (
            torch.rand(batch, parents, generator=generator) < PARENT_PROBABILITY
        ).nonzero(as_tuple=True)
        draw = torch.rand(len(parent), generator=generator)
        has_child = draw < CHILDREN * CHILD_PROBABILITY
        child = (
            parents + CHILDREN * parent + (draw / CHILD_PROBABILITY).long().clamp(max=CHILDREN - 1)
        )
        noise_tokens = torch.arange(batch).repeat_interleave(noise)
        outside = parents * (1 + CHILDREN)  # the first latent outside the planted tree
        noise_latents = torch.randint(outside, d_sae, (batch * noise,), generator=generator)
        keys = torch.cat(
            [
                tokens * d_sae + parent,
                tokens[has_child] * d_sae + child[has_child],
                noise_tokens * d_sae + noise_latents,
            ]
        ).unique()
        codes = torch.sparse_coo_tensor(
            torch.stack([keys // d_sae, keys % d_sae]), torch.ones(len(keys)), (batch, d_sae)
        )
        timer["generation"] += time.perf_counter() - start
        yield codes


def probe(d_sae: int, n_batches: int, batch: int, noise: int) -> dict[str, Any]:
    """In this process: the peak memory rise and counting time of one tree search."""
    timer = {"generation": 0.0}
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = process_memory_mib("VmRSS")
    start = time.perf_counter()
    tree = hierarchy_from_codes(
        synthetic_batches(d_sae, n_batches, batch, noise, timer), paper_widths(d_sae)
    )
    total = time.perf_counter() - start
    planted = planted_edges(d_sae)
    found = set(tree.edges)
    return {
        "d_sae": d_sae,
        "tokens": tree.n_tokens,
        "batch": batch,
        "noise_latents_per_token": noise,
        "peak_rise_mib": process_memory_mib("VmHWM") - before,
        "full_matrix_mib": d_sae * d_sae * 4 / 2**20,
        "seconds": total - timer["generation"],
        "generation_seconds": timer["generation"],
        "edges": len(found),
        "planted_edges": len(planted),
        "precision": len(found & planted) / max(len(found), 1),
        "recall": len(found & planted) / len(planted),
        **tree.stats,
    }


def measure(d_sae: int, n_batches: int, batch: int, noise: int) -> dict[str, Any]:
    """``probe`` in a fresh process, freed memory handed back at once (the peak tracks live memory)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, "--probe", "--d-sae", str(d_sae)]
    command += ["--batches", str(n_batches), "--batch", str(batch), "--noise", str(noise)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--noise", type=int, default=30, help="random latents per token")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.d_sae, args.batches, args.batch, args.noise)))
        return
    row = measure(args.d_sae, args.batches, args.batch, args.noise)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), **row}))
        return
    print(
        f"d_sae {row['d_sae']}, {row['tokens']} tokens: {row['seconds']:.1f} s counting "
        f"({row['generation_seconds']:.1f} s generating codes), peak memory rise "
        f"{row['peak_rise_mib']:.0f} MiB (one dense d_sae x d_sae int32 matrix: "
        f"{row['full_matrix_mib']:.0f} MiB); at most {row['most_tracked_pairs']} tracked pairs, "
        f"{row['refused']} refused; planted edges {row['planted_edges']}, found {row['edges']}, "
        f"precision {row['precision']:.3f}, recall {row['recall']:.3f}"
    )


if __name__ == "__main__":
    main()
