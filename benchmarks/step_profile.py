"""Where one training step's time goes: its top operations, and where every sort-like one is called.

Profiles one or more training steps of one contender of ``step_time.py``
(built, stepped and warmed up exactly as there: forward, backward, Adam,
``zero_grad``; by default ours with the paper's five levels, BatchTopK,
sparse path, at the CPU default size) under ``torch.profiler`` with input
shapes and Python stacks, and prints:

- the operations with the most self CPU time over the profiled steps, with
  their share of it (Python's own time, between operations, is one row);
- the sort-like operations (``sort``, ``argsort``, ``topk``, ``kthvalue``,
  ``msort``, ``unique``) grouped by input shape, as
  ``key_averages(group_by_input_shape=True)`` groups them;
- every call of one, per profiled step: its input shapes, its self time in
  each step, and its call site, innermost first: the operations and autograd
  node it runs inside and the Python frames that called it. An operation of
  the backward pass is called from ``loss.backward()``; its line also names
  the forward operation whose backward it is, and where that was called.

Python frames read ``file(line): function``, the line being the function's
first (what the profiler records). Several steps (``--steps``) show how
much an operation's time varies from step to step: on a machine whose
cores other processes share, an operation that synchronises its threads
often can take 100 times its own work in one step and none extra in the
next (torch's CPU sort of 32,768 or more integers, a parallel radix sort
with several waits per pass, took 160 ms instead of 1 ms per call, see
``kernels.encoder_backward.latent_major_order``); ``--threads 1`` runs the
step on one thread.

    python benchmarks/step_profile.py                     # default size, 2 profiled steps
    python benchmarks/step_profile.py --dead-fraction 0.5  # with the dead-latent loss
    python benchmarks/step_profile.py --steps 4 --threads 1 --rows 30
    python benchmarks/step_profile.py --contender saelens_batchtopk
    python benchmarks/step_profile.py --json               # one JSON object

Which implementation each measured kernel ran (``kernels.measured``) is
printed too (the ``W_enc`` gradient's two run different operations): a run
times them in its first step and keeps the choice in the user's cache;
``SAE_MATRYOSHKA_KERNELS=encoder_weight_grad=csr`` fixes it, and
``SAE_MATRYOSHKA_KERNEL_CACHE=""`` keeps none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import step_time
import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from sae_lens_matryoshka.kernels import measured

#: the operations that rank or order their input
SORT_LIKE = (
    "aten::sort",
    "aten::argsort",
    "aten::msort",
    "aten::topk",
    "aten::kthvalue",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
)
#: the row Python's own time between operations is summed into
PYTHON = "(Python code between operations)"
_PYTHON_FRAME = re.compile(r"^(?P<path>.+\.py)\((?P<line>\d+)\): (?P<function>.+)$")
_CONTENDERS = tuple(name for name in step_time.CONTENDERS if name != step_time.SPARSIFY)


@dataclass
class OpRow:
    """One operation's self CPU time summed over the profiled steps."""

    name: str
    self_ms: float
    share: float
    calls: int


@dataclass
class SortCall:
    """One sort-like call site: the operation, its input shapes, and where it was called from."""

    name: str
    input_shapes: list[Any]
    #: innermost first: enclosing operations and autograd node, then Python frames
    site: list[str]
    #: for an operation of the backward pass: the forward operation and where it was called
    forward_site: list[str] = field(default_factory=list)
    #: self CPU milliseconds of this call in each profiled step (0 where it did not run)
    self_ms: list[float] = field(default_factory=list)
    #: total CPU milliseconds (with its children) in each profiled step
    total_ms: list[float] = field(default_factory=list)


def _python_frame(name: str) -> str | None:
    """``path(line): function`` with the path shortened, or None if ``name`` is no Python frame."""
    match = _PYTHON_FRAME.match(name)
    if match is None:
        return None
    path = match["path"]
    for marker in ("sae_lens_matryoshka/", "site-packages/", "benchmarks/", "tests/"):
        if marker in path:
            path = (marker if marker != "site-packages/" else "") + path.split(marker, 1)[1]
            break
    return f"{path}({match['line']}): {match['function']}"


def _is_python(name: str) -> bool:
    """Whether ``name`` is a Python frame's event (its self time is Python's own)."""
    return _python_frame(name) is not None or name.startswith("<built-in")


def call_site(event: FunctionEvent, depth: int) -> list[str]:
    """``event``'s enclosing operations and frames, innermost first, at most ``depth`` Python frames.

    ``<built-in method ...>`` entries are left out (the frame above names the
    call), and so are torch's own Python frames between ``loss.backward()``
    and the autograd engine.
    """
    site: list[str] = []
    frames = 0
    parent = event.cpu_parent
    while parent is not None and frames < depth:
        frame = _python_frame(parent.name)
        if frame is None:
            if not parent.name.startswith("<built-in"):
                site.append(parent.name)
        elif not frame.startswith(("torch/autograd/", "torch/_tensor.py")):
            site.append(frame)
            frames += 1
            if frame.startswith("step_time.py"):
                break  # the step itself; above it, only this script
        parent = parent.cpu_parent
    return site


def _forward_of(
    event: FunctionEvent, by_sequence: dict[int, FunctionEvent]
) -> FunctionEvent | None:
    """The forward operation whose backward ``event`` runs inside, if it runs in one."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return by_sequence.get(parent.sequence_nr)
        parent = parent.cpu_parent
    return None


def _forward_events(events: Iterable[FunctionEvent]) -> dict[int, FunctionEvent]:
    """The forward operation that made each autograd node, by the node's sequence number.

    Every operation records the sequence number the next autograd node will
    get, so several share one; the node is made by the last of them, so the
    latest to start is taken, then its enclosing operations of the same
    number (``embedding_bag`` around ``_embedding_bag``).
    """
    latest: dict[int, FunctionEvent] = {}
    for event in events:
        if event.sequence_nr < 0 or "Backward" in event.name or event.name.startswith("autograd"):
            continue
        if _is_python(event.name):
            continue
        known = latest.get(event.sequence_nr)
        if known is None or event.time_range.start > known.time_range.start:
            latest[event.sequence_nr] = event
    for number, event in latest.items():
        while event.cpu_parent is not None and event.cpu_parent.sequence_nr == number:
            event = event.cpu_parent
        latest[number] = event
    return latest


def _sort_calls(events: list[FunctionEvent], depth: int) -> list[tuple[tuple[str, ...], SortCall]]:
    """Every outermost sort-like call of one step, with the key that identifies its site."""
    by_sequence = _forward_events(events)
    calls = []
    for event in events:
        if event.name not in SORT_LIKE:
            continue
        parent = event.cpu_parent
        if parent is not None and parent.name in SORT_LIKE:
            continue  # argsort's sort, topk's own dispatch: counted in the outer one
        site = call_site(event, depth)
        forward = _forward_of(event, by_sequence)
        forward_site = [forward.name, *call_site(forward, depth)] if forward is not None else []
        shapes = [list(shape) for shape in event.input_shapes if shape]
        call = SortCall(event.name, shapes, site, forward_site)
        key = (event.name, json.dumps(shapes), *site, *forward_site)
        calls.append((key, call))
        call.self_ms.append(_self_ms(event))
        call.total_ms.append(event.cpu_time_total / 1e3)
    return calls


def _self_ms(event: FunctionEvent) -> float:
    """Self time including the nested sort-like dispatches of the same call (argsort -> sort)."""
    nested = sum(_self_ms(child) for child in event.cpu_children if child.name in SORT_LIKE)
    return event.self_cpu_time_total / 1e3 + nested


@dataclass
class StepProfiles:
    """What ``profile_steps`` found: the top operations and the sort-like calls, with the setting."""

    contender: str
    size: dict[str, Any]
    threads: int
    kernels: dict[str, dict[str, str]]
    #: wall seconds of each profiled step (under the profiler: a little slower than unprofiled)
    step_seconds: list[float]
    self_total_ms: float
    top: list[OpRow]
    #: ``(name, input shapes)`` -> calls and self milliseconds over all steps
    sort_by_shape: list[dict[str, Any]]
    sort_calls: list[SortCall]


def profile_steps(args: argparse.Namespace) -> StepProfiles:
    """Profile ``args.steps`` steps of ``args.contender`` after ``args.warmup`` unprofiled ones."""
    if args.threads:
        torch.set_num_threads(args.threads)
    step_time.set_precision(args.precision)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # sparsify-free, but SAELens may print
        model = step_time.build(args.contender, args)
    x = torch.randn(args.batch, args.d_in, device=args.device)
    step = step_time.make_step(model, x, args)
    for _ in range(args.warmup):
        step()
    step_seconds: list[float] = []
    self_by_name: dict[str, float] = {}
    calls_by_name: dict[str, int] = {}
    by_shape: dict[tuple[str, str], dict[str, Any]] = {}
    sorts: dict[tuple[str, ...], SortCall] = {}
    for index in range(args.steps):
        with profile(
            activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True
        ) as prof:
            step_time._sync(args.device)
            start = time.perf_counter()
            step()
            step_time._sync(args.device)
            step_seconds.append(time.perf_counter() - start)
        for average in prof.key_averages():
            name = PYTHON if _is_python(average.key) else average.key
            self_by_name[name] = self_by_name.get(name, 0.0) + average.self_cpu_time_total / 1e3
            calls_by_name[name] = calls_by_name.get(name, 0) + average.count
        for average in prof.key_averages(group_by_input_shape=True):
            if average.key in SORT_LIKE:
                shape_key = (average.key, str(average.input_shapes))
                row = by_shape.setdefault(
                    shape_key,
                    {
                        "name": average.key,
                        "input_shapes": str(average.input_shapes),
                        "calls": 0,
                        "self_ms": 0.0,
                    },
                )
                row["calls"] += average.count
                row["self_ms"] += average.self_cpu_time_total / 1e3
        for key, call in _sort_calls(list(prof.events()), args.depth):
            known = sorts.get(key)
            if known is None:
                # a call first seen in this step ran 0 ms in the steps before
                call.self_ms[:0] = [0.0] * index
                call.total_ms[:0] = [0.0] * index
                sorts[key] = call
            elif len(known.self_ms) > index:  # the same site again in this step: add up
                known.self_ms[-1] += call.self_ms[0]
                known.total_ms[-1] += call.total_ms[0]
            else:
                known.self_ms.append(call.self_ms[0])
                known.total_ms.append(call.total_ms[0])
        for call in sorts.values():  # sites this step did not reach
            while len(call.self_ms) <= index:
                call.self_ms.append(0.0)
                call.total_ms.append(0.0)
    total = sum(self_by_name.values())
    top = [
        OpRow(name, self_ms, self_ms / total if total else 0.0, calls_by_name[name])
        for name, self_ms in sorted(self_by_name.items(), key=lambda item: -item[1])
    ][: args.rows]
    return StepProfiles(
        contender=args.contender,
        size={
            "d_in": args.d_in,
            "d_sae": args.d_sae,
            "batch": args.batch,
            "k": args.k,
            "dead_fraction": args.dead_fraction,
            "precision": args.precision,
            "device": args.device,
            "matryoshka_widths": step_time.paper_widths(args.d_sae),
        },
        threads=torch.get_num_threads(),
        kernels=measured.choices(),
        step_seconds=step_seconds,
        self_total_ms=total,
        top=top,
        sort_by_shape=sorted(by_shape.values(), key=lambda row: -row["self_ms"]),
        sort_calls=sorted(sorts.values(), key=lambda call: -sum(call.self_ms)),
    )


def report(result: StepProfiles) -> None:
    steps = len(result.step_seconds)
    print(
        f"{result.contender}, {step_time.machine(result.size['device'])} "
        f"(torch.get_num_threads() = {result.threads}), torch {torch.__version__}, "
        f"size {result.size}"
    )
    print(f"kernel choices: {result.kernels or 'none measured'}")
    walls = ", ".join(f"{seconds:.3f}" for seconds in result.step_seconds)
    print(f"{steps} profiled step(s), wall seconds each (under the profiler): {walls}")
    print(
        f"\nTop operations by self CPU time, summed over the {steps} step(s) "
        f"({result.self_total_ms:.1f} ms in all):"
    )
    print(f"  {'self ms':>10} {'share':>7} {'calls':>6}  name")
    for row in result.top:
        print(f"  {row.self_ms:10.1f} {row.share:7.1%} {row.calls:6d}  {row.name}")
    print(
        "\nSort-like operations grouped by input shape (key_averages(group_by_input_shape=True)):"
    )
    if not result.sort_by_shape:
        print("  none")
    for row in result.sort_by_shape:
        print(
            f"  {row['self_ms']:10.1f} ms self {row['calls']:4d} calls  "
            f"{row['name']} {row['input_shapes']}"
        )
    print("\nSort-like calls, self ms in each profiled step, innermost frame first:")
    for call in result.sort_calls:
        per_step = " / ".join(f"{ms:.1f}" for ms in call.self_ms)
        print(f"  {call.name} {call.input_shapes}: {per_step} ms")
        for frame in call.site:
            print(f"      <- {frame}")
        if call.forward_site:
            print(f"      backward of {call.forward_site[0]}, called at:")
            for frame in call.forward_site[1:]:
                print(f"          <- {frame}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(step_time.PRESETS), default="cpu")
    parser.add_argument("--d-in", type=int)
    parser.add_argument("--d-sae", type=int)
    parser.add_argument("--batch", type=int, help="tokens per step")
    parser.add_argument("--k", type=int)
    parser.add_argument("--contender", choices=_CONTENDERS, default=step_time.OURS)
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="fraction of the latents marked dead in the step (0: no dead-latent loss)",
    )
    parser.add_argument("--precision", choices=step_time.PRECISIONS, default="fp32")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps before them")
    parser.add_argument("--rows", type=int, default=20, help="operations in the top table")
    parser.add_argument("--depth", type=int, default=8, help="Python frames per call site")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument(
        "--device",
        type=step_time.usable_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for key, value in step_time.PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.dead_fraction <= 1:
        parser.error(f"--dead-fraction must lie in [0, 1], got {args.dead_fraction}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--steps must be >= 1, --warmup and --threads >= 0")
    return args


def main() -> None:
    args = parse_args()
    result = profile_steps(args)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        report(result)


if __name__ == "__main__":
    main()
