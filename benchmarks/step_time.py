"""Time and memory of one training step, ours against SAELens's own classes, plus a full run.

One step is SAELens's: ``training_forward_pass``, ``backward``, an Adam step and
``zero_grad``. Our 5-level Matryoshka SAE (sparse path, the default, and the
dense path) and SAELens's ``batchtopk`` and ``matryoshka_batchtopk`` share the
same size and initial weights, run in the same process, interleaved step by
step so that machine noise hits all of them alike; the median over repeats is
reported, with ratios to SAELens. Peak memory of one step is measured per SAE:
on a GPU with CUDA's peak-allocation counter, on CPU in a fresh process per SAE
as the rise of its peak resident set during one step.

The end-to-end part times complete ``LanguageModelSAETrainingRunner`` runs
(activation store, model forward passes, trainer) on a tiny random
``HookedTransformer``, ours vs SAELens's ``matryoshka_batchtopk``, in tokens per second.

    python benchmarks/step_time.py                  # CPU default: d_in=768, d_sae=16384, 2048 tokens, k=40
    python benchmarks/step_time.py --preset gemma   # Gemma-2-2B size: d_in=2304, d_sae=65536, 4096 tokens
    python benchmarks/step_time.py --json           # one JSON object, for machines
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from tiny_runs import process_memory_mib, runner_config, tiny_model_and_tokens

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig

PRESETS = {
    "cpu": {"d_in": 768, "d_sae": 16384, "batch": 2048, "k": 40},
    "gemma": {"d_in": 2304, "d_sae": 65536, "batch": 4096, "k": 40},
}
SAE_NAMES = ("ours_sparse", "ours_dense", "saelens_batchtopk", "saelens_matryoshka_batchtopk")


def paper_widths(d_sae: int) -> list[int]:
    """The paper's five levels: 1/32, 3/32, 7/32, 15/32 and all of the dictionary."""
    return [d_sae // 32, 3 * d_sae // 32, 7 * d_sae // 32, 15 * d_sae // 32, d_sae]


def build_sae(name: str, d_in: int, d_sae: int, k: int, device: str) -> TrainingSAE:
    size = {"d_in": d_in, "d_sae": d_sae, "k": k, "device": device}
    widths = paper_widths(d_sae)
    if name.startswith("ours"):
        path = "sparse" if name == "ours_sparse" else "dense"
        cfg = MatryoshkaTrainingSAEConfig(matryoshka_widths=widths, training_path=path, **size)
        return MatryoshkaTrainingSAE(cfg)
    if name == "saelens_batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**size))
    return MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **size)
    )


def make_step(sae: TrainingSAE, x: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device),
        n_training_steps=0,
        is_logging_step=False,
    )

    def step() -> None:
        sae.training_forward_pass(step_input).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per step of every SAE, interleaved."""
    torch.manual_seed(0)
    saes = {name: build_sae(name, args.d_in, args.d_sae, args.k, args.device) for name in SAE_NAMES}
    shared = {name: p.detach() for name, p in saes["ours_sparse"].named_parameters()}
    for sae in saes.values():
        sae.load_state_dict(shared, strict=False)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    steps = {name: make_step(sae, x) for name, sae in saes.items()}
    for step in steps.values():  # warm-up (also creates Adam's state)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def step_peak_mib(name: str, args: argparse.Namespace) -> float:
    """Extra memory one step of ``name`` needs at its peak, above the weights and Adam's state."""
    torch.manual_seed(0)
    sae = build_sae(name, args.d_in, args.d_sae, args.k, args.device)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    step = make_step(sae, x)
    step()  # Adam's state exists from here on
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = process_memory_mib("VmRSS")
    step()
    return process_memory_mib("VmHWM") - before


def measure_memory(args: argparse.Namespace) -> dict[str, float]:
    """Per SAE: on CPU in a fresh process each, so one SAE's freed pages cannot hide another's."""
    if args.device.startswith("cuda"):
        peaks = {}
        for name in SAE_NAMES:
            peaks[name] = step_peak_mib(name, args)
            torch.cuda.empty_cache()
        return peaks
    # freed tensors go back to the OS at once, so the resident set tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    size = ["--d-in", str(args.d_in), "--d-sae", str(args.d_sae)]
    size += ["--batch", str(args.batch), "--k", str(args.k), "--device", args.device]
    peaks = {}
    for name in SAE_NAMES:
        command = [sys.executable, __file__, "--memory-probe", name, *size]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        peaks[name] = float(output.stdout.strip().splitlines()[-1])
    return peaks


def end_to_end_tokens_per_second(args: argparse.Namespace) -> dict[str, float]:
    """Tokens per second of whole runner runs on a tiny random model, ours vs SAELens."""
    from sae_lens import LanguageModelSAETrainingRunner

    d_model, d_sae, context = 256, 8192, 128
    model, dataset = tiny_model_and_tokens(2, d_model, 8, 1024, context, args.device)
    widths = paper_widths(d_sae)
    sae_cfgs = {
        "ours_sparse": MatryoshkaTrainingSAEConfig(
            d_in=d_model, d_sae=d_sae, k=32, matryoshka_widths=widths
        ),
        "saelens_matryoshka_batchtopk": MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_model, d_sae=d_sae, k=32, matryoshka_widths=list(widths)
        ),
    }
    result = {}
    for name, sae_cfg in sae_cfgs.items():
        with tempfile.TemporaryDirectory() as output:
            cfg = runner_config(
                sae_cfg,
                "blocks.1.hook_resid_post",
                context,
                output,
                training_tokens=args.e2e_tokens,
                train_batch_size_tokens=2048,
                n_batches_in_buffer=32,
                device=args.device,
            )
            runner = LanguageModelSAETrainingRunner(
                cfg, override_dataset=dataset, override_model=model
            )
            _sync(args.device)
            start = time.perf_counter()
            runner.run()
            _sync(args.device)
            result[name] = args.e2e_tokens / (time.perf_counter() - start)
    return result


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--d-in", type=int)
    parser.add_argument("--d-sae", type=int)
    parser.add_argument("--batch", type=int, help="tokens per step")
    parser.add_argument("--k", type=int)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--e2e-tokens", type=int, default=2048 * 40)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory-probe", choices=SAE_NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.memory_probe:
        print(step_peak_mib(args.memory_probe, args))
        return
    median = time_steps(args)
    result: dict[str, Any] = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "size": {
            "d_in": args.d_in,
            "d_sae": args.d_sae,
            "batch": args.batch,
            "k": args.k,
            "device": args.device,
            "matryoshka_widths": paper_widths(args.d_sae),
        },
        "median_step_seconds": median,
        "ours_vs_saelens_batchtopk": median["ours_sparse"] / median["saelens_batchtopk"],
        "ours_vs_saelens_matryoshka_batchtopk": median["ours_sparse"]
        / median["saelens_matryoshka_batchtopk"],
        "ours_sparse_vs_ours_dense": median["ours_sparse"] / median["ours_dense"],
    }
    if not args.skip_memory:
        result["step_peak_memory_mib"] = measure_memory(args)
    if not args.skip_end_to_end:
        # TransformerLens prints while building the model; stdout is for the result
        with contextlib.redirect_stdout(sys.stderr):
            result["end_to_end_tokens_per_second"] = end_to_end_tokens_per_second(args)
    if args.json:
        print(json.dumps(result))
        return
    report(result)


def report(result: dict[str, Any]) -> None:
    print(f"{result['machine']}, torch {result['torch']}, size {result['size']}")
    memory = result.get("step_peak_memory_mib", {})
    print(f"  {'':<30} {'ms/step':>9} {'step peak MiB':>14}")
    for name, seconds in result["median_step_seconds"].items():
        peak = f"{memory[name]:14.0f}" if name in memory else ""
        print(f"  {name:<30} {seconds * 1000:9.1f} {peak}")
    print(
        f"  ours / SAELens batchtopk step time:            {result['ours_vs_saelens_batchtopk']:.2f}x"
    )
    print(
        "  ours / SAELens matryoshka_batchtopk step time: "
        f"{result['ours_vs_saelens_matryoshka_batchtopk']:.2f}x"
    )
    print(
        f"  ours sparse / ours dense step time:            {result['ours_sparse_vs_ours_dense']:.2f}x"
    )
    if "end_to_end_tokens_per_second" in result:
        e2e = result["end_to_end_tokens_per_second"]
        print("  end to end (runner, tiny model, d_sae=8192):")
        for name, rate in e2e.items():
            print(f"    {name:<30} {rate:9.0f} tokens/s")
        ratio = e2e["ours_sparse"] / e2e["saelens_matryoshka_batchtopk"]
        print(f"    ours / SAELens matryoshka_batchtopk throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
