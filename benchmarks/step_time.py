"""Time and memory of one training step: ours against SAELens's own SAEs and sparsify's, plus a full run.

One step is forward, backward, an Adam step and ``zero_grad``: SAELens's
``training_forward_pass`` for the SAELens-style SAEs, and for EleutherAI's
sparsify (the fastest peer, optional ``bench`` extra) ``SparseCoder.forward``
with its FVU and AuxK losses, its sparse encoder backward and its sparse
decoder (without the decoder-norm projection its trainer adds, which only
makes it slower). Every contender starts from the same weights, runs in the
same process, interleaved step by step so that machine noise hits all of them
alike, on the same batch; the median over repeats is reported, with ratios.

Contenders: our Matryoshka SAE with the paper's five levels (BatchTopK, sparse
path, the default; and the dense path), our one-level BatchTopK and TopK,
SAELens's ``batchtopk``, ``topk`` and ``matryoshka_batchtopk`` (same five
levels), and sparsify's TopK ``SparseCoder`` (without the ``bench`` extra,
its row says sparsify is not installed and how to install it).

Beside them runs the floor (:class:`Floor`): the encoder's forward matmul and
one Adam step, what no step of an SAE this size can avoid. Each contender's
time is printed as a multiple of it, with issue 29's targets for ours (at most
1.3x the floor with no latent dead, 1.5x with some; 1.1x our one level; 0.8x
sparsify; 0.2x SAELens ``batchtopk``), met or missed, and the implementation
each measured kernel chose (``kernels.measured``).

Every contender's step gets the same dead-latent mask, ``--dead-fraction`` of
the dictionary dead (the same latents for all; SAELens's ``dead_neuron_mask``,
sparsify's ``dead_mask``), so that each pays for its dead-latent loss alike;
0 (the default) skips that loss everywhere. ``--precision`` applies one
numeric policy to every contender: ``fp32`` (TF32 off), ``tf32`` (CUDA
matmuls in TF32, ``torch.set_float32_matmul_precision("high")``) or ``bf16``
(each forward under ``torch.autocast(device_type, dtype=torch.bfloat16)``,
backward outside it, as SAELens's trainer runs with ``autocast=True``; slow on
CPU, but it runs). sparsify's ``forward`` carries its own bf16 autocast for
CUDA, which would put it in bf16 whatever the others ran in: it is called
without it, under the same policy as the others. Adam's state is made
before the first step; then every contender takes ``--warmup`` untimed steps
(on a GPU the caching allocator and cuBLAS's kernel choices settle over the
first few) before the timed ones, and on a GPU the clock is read after
``torch.cuda.synchronize()`` on both sides of each step. Beside each median
time is the memory the step faulted in (``faulted MiB``, :func:`faulted_mib`):
on CPU, what allocating large tensors afresh every step costs.

Peak memory of one step is measured per contender, after the same warm-up:
on a GPU with CUDA's peak-allocation counter (``reset_peak_memory_stats``,
then ``max_memory_allocated``), on CPU in a fresh process per contender as the
rise of its peak resident set during one step (above its weights and Adam's
state). The end-to-end part times complete ``LanguageModelSAETrainingRunner``
runs (activation store, model forward passes, trainer) on a tiny random
``HookedTransformer``, ours vs SAELens's ``matryoshka_batchtopk``, in tokens per second.

    python benchmarks/step_time.py                  # CPU default: d_in=768, d_sae=16384, 2048 tokens, k=40
    python benchmarks/step_time.py --preset small   # d_in=64, d_sae=512, 256 tokens, k=8: per-step overhead
    python benchmarks/step_time.py --preset gemma   # Gemma-2-2B size: d_in=2304, d_sae=65536, 4096 tokens
    python benchmarks/step_time.py --dead-fraction 0.5 --precision bf16
    python benchmarks/step_time.py --contenders ours_matryoshka_5_levels sparsify_topk
    python benchmarks/step_time.py --json           # one JSON object, for machines
    python benchmarks/step_time.py --keep-freed-memory   # CPU: no page faults (see below)

At the Gemma size on CPU only memory is worth measuring (a step takes
minutes, and all contenders together outgrow a small machine's memory):
``--preset gemma --skip-timing --skip-end-to-end --warmup 0 --contenders ...``
runs just the fresh-process memory probes, one step each.

On CPU with glibc's default allocator, every freed block above 32 MiB goes
back to the operating system, so each step page-faults its large tensors
(pre-activations, gradients, Adam's temporaries) back in: at the default size
that is 10-25% of our step, and more for contenders that allocate more.
``--keep-freed-memory`` has glibc keep freed memory for reuse (``mallopt``
thresholds of 1 GiB, what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set), as a caching allocator does on a GPU, so
that the contenders are compared on their computation alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from tiny_runs import process_memory_mib, runner_config, tiny_model_and_tokens
from torch import nn

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.kernels.measured import choices, cpu_model

PRECISIONS = ("fp32", "tf32", "bf16")
PRESETS = {
    "cpu": {"d_in": 768, "d_sae": 16384, "batch": 2048, "k": 40},
    "small": {"d_in": 64, "d_sae": 512, "batch": 256, "k": 8},
    "gemma": {"d_in": 2304, "d_sae": 65536, "batch": 4096, "k": 40},
}
#: the contender every ratio is taken of
OURS = "ours_matryoshka_5_levels"
#: what no step can go below, timed beside the contenders (see :class:`Floor`)
FLOOR = "floor_gemm_adam"
#: issue 29's targets for ours: ``(contender, most ours / contender may be)``; the
#: floor's bound is 1.3 with no latent dead and 1.5 with any dead (:func:`targets`)
TARGETS = (
    (FLOOR, None),
    ("ours_batchtopk_1_level", 1.1),
    ("sparsify_topk", 0.8),
    ("saelens_batchtopk", 0.2),
)
#: the one contender that needs the optional ``bench`` extra (EleutherAI's sparsify)
SPARSIFY = "sparsify_topk"
#: what the report says in place of its row when sparsify is missing
SPARSIFY_MISSING = 'not installed (pip install -e ".[bench]")'
#: every contender this script knows, whether or not sparsify is installed
CONTENDERS = (
    OURS,
    "ours_matryoshka_5_levels_dense",
    "ours_batchtopk_1_level",
    "ours_topk_1_level",
    "saelens_batchtopk",
    "saelens_topk",
    "saelens_matryoshka_batchtopk",
    SPARSIFY,
)


def has_sparsify() -> bool:
    """Whether sparsify is installed: looked up, not imported (its import takes seconds)."""
    return importlib.util.find_spec("sparsify") is not None


def usable_device(device: str) -> str:
    """``device`` if this torch can run on it; else argparse's one-line error saying why and what to do.

    Without this, ``--device cuda`` on a CPU-only torch gets as far as naming
    the machine and ends in a long traceback from inside ``torch.cuda``.
    """
    try:
        kind = torch.device(device)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{device!r} is not a torch device: {error}") from None
    if kind.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise argparse.ArgumentTypeError(
                f"{device}: torch {torch.__version__} here was built without CUDA; install a "
                "CUDA build of torch (https://pytorch.org/get-started/locally/) or use --device cpu"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{device}: torch sees no CUDA device (torch.cuda.is_available() is False); "
                "check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu"
            )
        if kind.index is not None and kind.index >= count:
            raise argparse.ArgumentTypeError(
                f"{device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(
            f"{device}: MPS is not available here (it needs macOS on Apple silicon and a torch "
            "built with MPS); use --device cpu"
        )
    return device


def paper_widths(d_sae: int) -> list[int]:
    """The paper's five levels: 1/32, 3/32, 7/32, 15/32 and all of the dictionary."""
    return [d_sae // 32, 3 * d_sae // 32, 7 * d_sae // 32, 15 * d_sae // 32, d_sae]


def build(name: str, args: argparse.Namespace) -> nn.Module:
    size = {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "device": args.device}
    widths = paper_widths(args.d_sae)
    if name == "sparsify_topk":
        from sparsify import SparseCoder, SparseCoderConfig

        cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k)
        return SparseCoder(args.d_in, cfg, device=args.device)
    if name.startswith("ours"):
        ours: dict[str, Any] = {
            OURS: {"matryoshka_widths": widths},
            "ours_matryoshka_5_levels_dense": {
                "matryoshka_widths": widths,
                "training_path": "dense",
            },
            "ours_batchtopk_1_level": {"matryoshka_widths": [args.d_sae]},
            "ours_topk_1_level": {"matryoshka_widths": [args.d_sae], "activation": "topk"},
        }[name]
        with _quiet_single_level():
            return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**size, **ours))
    if name == "saelens_batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**size))
    if name == "saelens_topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**size))
    return MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **size)
    )


class Floor(nn.Module):
    """What every training step of an SAE of this size pays, and nothing else: the floor.

    The encoder's forward matmul (``x @ W_enc + b_enc``: every pre-activation
    competes in a top-k selection, so no sparse path avoids it) and one Adam
    step over the SAE's four parameters (Adam touches every parameter,
    whatever the gradient's sparsity). Its gradients are made once and kept,
    and the matmul writes into the memory of the last step's result (as ours
    does on CPU, ``kernels.kept_memory``; in a result of its own under bf16
    autocast, which casts the inputs), so the floor allocates nothing per
    step but Adam's own temporaries, which every contender's Adam allocates
    too; a contender's time over it is everything else: selection, decode,
    losses, backward, allocation. (Before commit af1a0ce the floor's matmul
    wrote a fresh result every step, 128 MiB at the CPU default size, which
    took it 60 ms more on one 2-thread AMD EPYC to fault in.)
    """

    def __init__(self, d_in: int, d_sae: int, device: str) -> None:
        super().__init__()
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-4)
        for parameter in self.parameters():
            parameter.grad = torch.randn_like(parameter)
        self.optimizer.step()  # Adam's state, before any timed step
        #: the last step's pre-activations, whose memory the next step's are written into
        self.pre_activations: torch.Tensor | None = None

    def step(self, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
        """The encoder's forward matmul on ``x`` (under ``args``' precision), then Adam.

        Returns the pre-activations.
        """
        with torch.no_grad(), forward_precision(args):
            last = self.pre_activations
            if args.precision == "bf16" or last is None or last.shape[0] != x.shape[0]:
                self.pre_activations = torch.addmm(self.b_enc, x, self.W_enc)
            else:
                torch.addmm(self.b_enc, x, self.W_enc, out=last)
        self.optimizer.step()
        return self.pre_activations


@contextlib.contextmanager
def _quiet_single_level() -> Iterator[None]:
    """One-level SAEs are the point here, not a mistake to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*only one level")
        yield


def share_weights(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` the weights of ``source`` (a SAELens-style SAE)."""
    with torch.no_grad():
        if hasattr(target, "encoder"):  # sparsify: nn.Linear encoder, W_dec [num_latents, d_in]
            target.encoder.weight.copy_(source.W_enc.T)
            target.encoder.bias.copy_(source.b_enc)
        else:
            target.W_enc.copy_(source.W_enc)
            target.b_enc.copy_(source.b_enc)
        target.W_dec.copy_(source.W_dec)
        target.b_dec.copy_(source.b_dec)


def dead_latents(args: argparse.Namespace) -> torch.Tensor:
    """The dead-latent mask every contender gets: ``dead_fraction`` of the latents, at random."""
    order = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    dead[order[: round(args.dead_fraction * args.d_sae)]] = True
    return dead.to(args.device)


def set_precision(precision: str) -> None:
    """Float32 matmuls exact for ``fp32`` and ``bf16`` (outside autocast), TF32 on CUDA for ``tf32``."""
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def forward_precision(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """What each contender's forward runs under: bf16 autocast, as SAELens's trainer, or nothing."""
    if args.precision == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_loss(
    model: nn.Module, x: torch.Tensor, args: argparse.Namespace
) -> Callable[[], torch.Tensor]:
    """The loss of ``model`` on ``x`` (with every contender's dead latents), as its trainer computes it."""
    dead = dead_latents(args)
    if hasattr(model, "encoder"):
        # sparsify's forward, without the bf16 autocast its decorator adds on CUDA:
        # --precision decides, for it as for the others
        forward = getattr(type(model).forward, "__wrapped__", type(model).forward)

        def sparsify_loss() -> torch.Tensor:
            out = forward(model, x, dead_mask=dead)
            return out.fvu + out.auxk_loss

        return sparsify_loss
    step_input = TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=dead,
        # past the first step, as every step but one of a run: ours checks the first
        # batch for what a run cannot learn from (a pass over the pre-activations)
        n_training_steps=1,
        is_logging_step=False,
    )
    return lambda: model.training_forward_pass(step_input).loss


def make_step(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> Callable[[], None]:
    """One training step of ``model`` on ``x``: forward, backward, Adam, zero_grad."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # Adam's state is made up front, so that no step, warm-up or measured, pays for
    # it: an Adam step on zero gradients moves no weight
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = make_loss(model, x, args)

    def step() -> None:
        with forward_precision(args):
            value = loss()
        value.backward()  # outside autocast, as SAELens's trainer
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def faulted_mib() -> float:
    """Memory this process has faulted in so far (its minor page faults), in MiB.

    On CPU a step that allocates a large tensor afresh pays for faulting its
    pages in (glibc hands blocks above 32 MiB back to the operating system when
    they are freed): the step times include it, a profile books it to
    whichever operation touched the pages first, and this shows it apart.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize() / 2**20


def time_steps(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of every contender and the floor, interleaved, after ``args.warmup`` steps each.

    And the median memory each step faulted in (:func:`faulted_mib`), in MiB.
    """
    torch.manual_seed(0)
    models = {name: build(name, args) for name in args.contenders}
    # one set of initial weights for all: the first SAELens-style contender's
    source = next((model for model in models.values() if not hasattr(model, "encoder")), None)
    if source is not None:
        for model in models.values():
            share_weights(model, source)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    steps = {name: make_step(model, x, args) for name, model in models.items()}
    floor = Floor(args.d_in, args.d_sae, args.device)
    steps[FLOOR] = lambda: floor.step(x, args)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            _sync(args.device)
            faulted, start = faulted_mib(), time.perf_counter()
            step()
            _sync(args.device)
            times[name].append(time.perf_counter() - start)
            faults[name].append(faulted_mib() - faulted)
    return (
        {name: statistics.median(values) for name, values in times.items()},
        {name: statistics.median(values) for name, values in faults.items()},
    )


def step_peak_mib(name: str, args: argparse.Namespace) -> float:
    """Extra memory one step of ``name`` needs at its peak, above the weights and Adam's state."""
    torch.manual_seed(0)
    model = build(name, args)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    step = make_step(model, x, args)  # with Adam's state
    for _ in range(args.warmup):
        step()
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
    """Per contender: on CPU in a fresh process each, so one's freed pages cannot hide another's."""
    if args.device.startswith("cuda"):
        peaks = {}
        for name in args.contenders:
            peaks[name] = step_peak_mib(name, args)
            torch.cuda.empty_cache()
        return peaks
    # freed tensors go back to the OS at once, so the resident set tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    options = ["--d-in", str(args.d_in), "--d-sae", str(args.d_sae)]
    options += ["--batch", str(args.batch), "--k", str(args.k), "--device", args.device]
    options += ["--dead-fraction", str(args.dead_fraction), "--precision", args.precision]
    options += ["--warmup", str(args.warmup)]
    peaks = {}
    for name in args.contenders:
        command = [sys.executable, __file__, "--memory-probe", name, *options]
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
        OURS: MatryoshkaTrainingSAEConfig(
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
                autocast=args.precision == "bf16",
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


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks up to 1 GiB for reuse instead of unmapping them."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    for option in (m_mmap_threshold, m_trim_threshold):
        if not libc.mallopt(option, 1 << 30):
            raise OSError(f"glibc refused mallopt({option}, 1 GiB)")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--d-in", type=int)
    parser.add_argument("--d-sae", type=int)
    parser.add_argument("--batch", type=int, help="tokens per step")
    parser.add_argument("--k", type=int)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per contender")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per contender before the measured ones (allocator, autotuning)",
    )
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="fraction of the latents marked dead in every step (the same for every contender)",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        metavar="NAME",
        help=f"which to run (default all: {', '.join(CONTENDERS)}; "
        f"{SPARSIFY} needs the bench extra)",
    )
    parser.add_argument(
        "--device", type=usable_device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--e2e-tokens", type=int, default=2048 * 40)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="CPU, Linux/glibc: keep freed memory for reuse, so steps do not page-fault",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory-probe", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.dead_fraction <= 1:
        parser.error(f"--dead-fraction must lie in [0, 1], got {args.dead_fraction}")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    # a missing sparsify drops its row from the default run, and the report says so
    args.not_installed = [] if has_sparsify() else [SPARSIFY]
    if args.contenders is None:
        args.contenders = [name for name in CONTENDERS if name not in args.not_installed]
    elif SPARSIFY in args.contenders and args.not_installed:
        parser.error(
            f"argument --contenders: {SPARSIFY} needs sparsify, which is {SPARSIFY_MISSING}"
        )
    return args


def main() -> None:
    args = parse_args()
    set_precision(args.precision)
    if args.memory_probe:
        print(step_peak_mib(args.memory_probe, args))
        return
    if args.keep_freed_memory:
        keep_freed_memory()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    report(result)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement ``args`` asks for, as one JSON-ready object."""
    result: dict[str, Any] = {
        "machine": machine(args.device),
        "torch": torch.__version__,
        "allocator": "keeps freed memory" if args.keep_freed_memory else "default",
        "precision": args.precision,
        "dead_fraction": args.dead_fraction,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "not_installed": args.not_installed,
        "size": {
            "d_in": args.d_in,
            "d_sae": args.d_sae,
            "batch": args.batch,
            "k": args.k,
            "device": args.device,
            "matryoshka_widths": paper_widths(args.d_sae),
        },
    }
    if not args.skip_timing:
        # sparsify announces its decoder on import; stdout is for the result
        with contextlib.redirect_stdout(sys.stderr):
            median, faults = time_steps(args)
        floor = median.pop(FLOOR)
        result["median_step_seconds"] = median
        result["floor_step_seconds"] = floor
        result["floor_page_faults_mib"] = faults.pop(FLOOR)
        result["step_page_faults_mib"] = faults
        result["step_time_ratio_to_floor"] = {name: s / floor for name, s in median.items()}
        if OURS in median:
            result["ours_step_time_ratio_to"] = {
                name: median[OURS] / seconds for name, seconds in median.items() if name != OURS
            }
            result["targets"] = targets(result)
        result["kernel_choices"] = choices()
    if not args.skip_memory:
        result["step_peak_memory_mib"] = measure_memory(args)
    if not args.skip_end_to_end:
        # TransformerLens prints while building the model; stdout is for the result
        with contextlib.redirect_stdout(sys.stderr):
            result["end_to_end_tokens_per_second"] = end_to_end_tokens_per_second(args)
    return result


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of issue 29's targets this run can check: ours / what, the bound, the ratio, met or not."""
    ratios = {FLOOR: result["step_time_ratio_to_floor"][OURS], **result["ours_step_time_ratio_to"]}
    checked = []
    for name, bound in TARGETS:
        if name not in ratios:
            continue
        if bound is None:
            bound = 1.3 if result["dead_fraction"] == 0 else 1.5
        ratio = ratios[name]
        checked.append({"of": name, "at_most": bound, "ratio": ratio, "met": ratio <= bound})
    return checked


def report(result: dict[str, Any]) -> None:
    print(
        f"{result['machine']}, torch {result['torch']}, {result['allocator']} allocator, "
        f"{result['precision']}, {result['dead_fraction']:.0%} of latents dead, "
        f"{result['warmup_steps']} warm-up steps, size {result['size']}"
    )
    seconds = result.get("median_step_seconds", {})
    memory = result.get("step_peak_memory_mib", {})
    ratios = result.get("ours_step_time_ratio_to", {})
    to_floor = result.get("step_time_ratio_to_floor", {})
    faults = result.get("step_page_faults_mib", {})
    print(
        f"  {'':<32} {'ms/step':>9} {'/ floor':>8} {'faulted MiB':>12} {'step peak MiB':>14}"
        f" {'ours / this':>12}"
    )
    if "floor_step_seconds" in result:
        print(
            f"  {FLOOR + ' (GEMM + Adam)':<32} {result['floor_step_seconds'] * 1000:9.1f}"
            f" {'':8} {result['floor_page_faults_mib']:12.0f}"
        )
    for name in {**seconds, **memory}:
        time_ms = f"{seconds[name] * 1000:9.1f}" if name in seconds else f"{'':9}"
        floor = f"{to_floor[name]:7.2f}x" if name in to_floor else f"{'':8}"
        faulted = f"{faults[name]:12.0f}" if name in faults else f"{'':12}"
        peak = f"{memory[name]:14.0f}" if name in memory else f"{'':14}"
        ratio = f"{ratios[name]:11.2f}x" if name in ratios else f"{'':12}"
        print(f"  {name:<32} {time_ms} {floor} {faulted} {peak} {ratio}")
    for name in result["not_installed"]:
        print(f"  {name:<32} {SPARSIFY_MISSING}")
    for target in result.get("targets", []):
        verdict = "met" if target["met"] else "MISSED"
        print(
            f"  target: ours / {target['of']} at most {target['at_most']:.1f}x: "
            f"{target['ratio']:.2f}x, {verdict}"
        )
    if result.get("kernel_choices"):
        print(f"  kernels chosen: {json.dumps(result['kernel_choices'])}")
    if "end_to_end_tokens_per_second" in result:
        e2e = result["end_to_end_tokens_per_second"]
        print("  end to end (runner, tiny model, d_sae=8192):")
        for name, rate in e2e.items():
            print(f"    {name:<30} {rate:9.0f} tokens/s")
        ratio = e2e[OURS] / e2e["saelens_matryoshka_batchtopk"]
        print(f"    ours / SAELens matryoshka_batchtopk throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
