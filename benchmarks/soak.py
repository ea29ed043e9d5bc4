"""Soak test: thousands of sparse-path training steps through SAELens's runner, memory over time.

A leak of a few kilobytes per step (a tensor kept alive by a hook, a growing
list of logged metrics, an autograd graph held across steps) is invisible in
unit tests and fatal in a day-long run. This trains a Matryoshka SAE with the
sparse path, Pareto prefixes and the per-level aux loss (dead latents appear
early with a short dead-feature window) on a tiny random ``HookedTransformer``
and samples the process's resident memory every ``--every`` steps (on a GPU,
``--device cuda``, also CUDA's allocated memory and its peak,
``torch.cuda.max_memory_allocated``). After warm-up (allocator pools and
Adam's state filled) the memory the run holds must stay flat: the resident
set on CPU, CUDA's allocated memory on a GPU. The script prints the samples,
the growth per 1000 steps and a verdict (``--json`` for machines), and exits
non-zero if memory grew: the least-squares trend after warm-up, over the
whole run, must stay under ``--tolerance-mib``.

    python benchmarks/soak.py                 # 3000 steps, about 90 s on 2 cores
    python benchmarks/soak.py --steps 20000
    python benchmarks/soak.py --device cuda --steps 2000 --every 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from tiny_runs import process_memory_mib, runner_config, tiny_model_and_tokens

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig

D_MODEL, CONTEXT = 64, 64


def memory_sample(device: str) -> dict[str, float]:
    """The process's resident memory, and on a GPU CUDA's allocated memory and its peak (MiB)."""
    sample = {"resident_mib": process_memory_mib()}
    if device.startswith("cuda"):
        sample["cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
        sample["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return sample


def soak(steps: int, batch: int, every: int, tolerance_mib: float, device: str) -> dict[str, Any]:
    torch.manual_seed(0)
    # TransformerLens prints while building the model; stdout is for the result
    with contextlib.redirect_stdout(sys.stderr):
        model, dataset = tiny_model_and_tokens(1, D_MODEL, 4, 512, CONTEXT, device)
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=1024,
        k=16,
        prefix_sampling="pareto",
        use_matryoshka_aux_loss=True,
        device=device,
    )
    sae = MatryoshkaTrainingSAE(sae_cfg)
    samples: list[tuple[int, dict[str, float]]] = []
    forward = sae.training_forward_pass

    def observed(step_input: TrainStepInput) -> TrainStepOutput:
        if step_input.n_training_steps % every == 0:
            samples.append((step_input.n_training_steps, memory_sample(device)))
        return forward(step_input)

    sae.training_forward_pass = observed  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as output:
        cfg = runner_config(
            sae_cfg,
            "blocks.0.hook_resid_post",
            CONTEXT,
            output,
            training_tokens=steps * batch,
            train_batch_size_tokens=batch,
            n_batches_in_buffer=16,
            dead_feature_window=50,
            feature_sampling_window=500,
            lr=1e-3,
            device=device,
        )
        runner = LanguageModelSAETrainingRunner(
            cfg,
            override_dataset=dataset,
            override_model=model,
            override_sae=sae,
        )
        start = time.perf_counter()
        runner.run()
        seconds = time.perf_counter() - start
    # what a leak grows: device tensors on a GPU, the process's memory on CPU
    held = "cuda_allocated_mib" if device.startswith("cuda") else "resident_mib"
    # a least-squares slope: single samples jitter by a few MiB as allocator pools cycle
    warm = torch.tensor([(step, sample[held]) for step, sample in samples if step >= steps // 10])
    step_offsets = warm[:, 0] - warm[:, 0].mean()
    slope = float(
        (step_offsets * (warm[:, 1] - warm[:, 1].mean())).sum() / step_offsets.pow(2).sum()
    )
    per_thousand = slope * 1000
    growth = slope * float(warm[-1, 0] - warm[0, 0])
    return {
        "steps": steps,
        "batch_tokens": batch,
        "device": device,
        "steps_per_second": steps / seconds,
        "memory_samples": samples,
        "trend_of": held,
        "growth_after_warm_up_mib": growth,
        "growth_per_1000_steps_mib": per_thousand,
        "flat": growth <= tolerance_mib,
        "tolerance_mib": tolerance_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512, help="tokens per step")
    parser.add_argument("--every", type=int, default=250, help="sample memory every N steps")
    parser.add_argument("--tolerance-mib", type=float, default=8.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = soak(args.steps, args.batch, args.every, args.tolerance_mib, args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['steps']} steps of {result['batch_tokens']} tokens on {result['device']}, "
            f"{result['steps_per_second']:.0f} steps/s"
        )
        for step, sample in result["memory_samples"]:
            line = f"  step {step:>7}: {sample['resident_mib']:8.1f} MiB resident"
            if "cuda_allocated_mib" in sample:
                line += (
                    f", CUDA {sample['cuda_allocated_mib']:8.1f} MiB allocated, "
                    f"{sample['cuda_max_allocated_mib']:8.1f} MiB max_memory_allocated"
                )
            print(line)
        verdict = "flat" if result["flat"] else "GROWING"
        print(
            f"  after warm-up ({result['trend_of']}): {result['growth_after_warm_up_mib']:+.1f} "
            f"MiB ({result['growth_per_1000_steps_mib']:+.2f} MiB per 1000 steps): {verdict}"
        )
    sys.exit(0 if result["flat"] else 1)


if __name__ == "__main__":
    main()
