"""A kernel with several implementations, the fastest chosen by timing them where it runs.

The fastest way to compute a sparse product depends on the machine: on one
CPU a CSR product is the faster, on another an ``embedding_bag`` over sorted
entries is several times faster, and a GPU differs again. A
:class:`MeasuredKernel` times each candidate a few times on the first call
for a shape (as ``torch.backends.cudnn.benchmark`` does), keeps the fastest
for the rest of the run and logs the choice once. The candidates compute the
same result up to float rounding (the tests hold them equal), so the choice
changes speed, never what is trained. Timing synchronises the device, but
only on those first calls: a steady step reads nothing back for it.

``SAE_MATRYOSHKA_KERNELS="name=candidate,..."`` fixes a kernel's choice (no
timing), for reproducible timings and for tests.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

#: ``"kernel=candidate,..."``: fixed choices, no timing
CHOICE_ENV = "SAE_MATRYOSHKA_KERNELS"
#: timed calls per candidate (after one untimed call, which warms caches and allocators)
_TIMED_CALLS = 2

_LOG = logging.getLogger(__name__)
Result = TypeVar("Result")


class MeasuredKernel(Generic[Result]):
    """A kernel ``name`` whose ``candidates`` compute the same; the fastest per key runs."""

    def __init__(self, name: str, candidates: dict[str, Callable[..., Result]]) -> None:
        self.name = name
        self.candidates = candidates
        #: the chosen candidate per key (shape, dtype, device), for the rest of the run
        self.chosen: dict[Hashable, str] = {}

    def __call__(self, key: Hashable, *args: torch.Tensor | int) -> Result:
        """The result of the chosen candidate for ``key`` on ``args``."""
        name = self.chosen.get(key) or self.fixed() or self._measure(key, args)
        return self.candidates[name](*args)

    def fixed(self) -> str | None:
        """The candidate ``SAE_MATRYOSHKA_KERNELS`` names for this kernel, if any."""
        for item in os.environ.get(CHOICE_ENV, "").split(","):
            kernel, _, candidate = item.partition("=")
            if kernel.strip() != self.name:
                continue
            if candidate.strip() not in self.candidates:
                raise ValueError(
                    f"{CHOICE_ENV}: kernel {self.name!r} has the candidates "
                    f"{sorted(self.candidates)}, got {candidate.strip()!r}."
                )
            return candidate.strip()
        return None

    def _measure(self, key: Hashable, args: tuple[torch.Tensor | int, ...]) -> str:
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        times = {
            name: _time(candidate, args, device) for name, candidate in self.candidates.items()
        }
        chosen = min(times, key=times.__getitem__)
        self.chosen[key] = chosen
        _LOG.info(
            "%s for %s: %s (measured %s)",
            self.name,
            key,
            chosen,
            ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in times.items()),
        )
        return chosen


def _time(
    candidate: Callable[..., object], args: tuple[torch.Tensor | int, ...], device: torch.device
) -> float:
    """The fastest of ``_TIMED_CALLS`` calls of ``candidate(*args)``, after one untimed call."""
    candidate(*args)
    best = float("inf")
    for _ in range(_TIMED_CALLS):
        _synchronize(device)
        start = time.perf_counter()
        candidate(*args)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
