"""Matryoshka levels: which prefix widths each training step trains and logs, with what weights.

A level is a prefix of the dictionary, ``m_l`` latents wide, that must
reconstruct the input on its own; the latents between two consecutive widths
form a *group*. The paper trains the same widths every step
(:class:`FixedLevels`); Nabeshima's Matryoshka SAEs sample the prefix lengths
anew every step (:class:`SampledLevels`). Either way a step gets a
:class:`LevelPlan`: its widths, group bounds and loss weights on the device.
How the levels are decoded is ``kernels.level_decode``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from typing_extensions import Self, override

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig


def pareto_prefix_probabilities(d_sae: int, power: float) -> torch.Tensor:
    """``P(l)`` proportional to ``l**power - (l - 1)**power`` for prefix lengths ``1 .. d_sae - 1``.

    With ``power < 1`` short prefixes are likelier, so early latents sit inside
    most sampled levels (Nabeshima's Matryoshka SAEs use ``power = 0.5``).
    """
    lengths = torch.arange(1, d_sae, dtype=torch.float64)
    weights = lengths**power - (lengths - 1) ** power
    return weights / weights.sum()


def sample_prefix_widths(
    probabilities: torch.Tensor, n_prefixes: int, generator: torch.Generator
) -> list[int]:
    """``n_prefixes - 1`` distinct prefix lengths drawn from ``probabilities``, plus the full width.

    ``probabilities[i]`` is the probability of length ``i + 1``; the full width
    is ``len(probabilities) + 1``. Returns the widths sorted increasingly.
    """
    d_sae = probabilities.numel() + 1
    if n_prefixes <= 1:
        return [d_sae]
    drawn = torch.multinomial(probabilities, n_prefixes - 1, replacement=False, generator=generator)
    return [*sorted((drawn + 1).tolist()), d_sae]


class LevelPlan(NamedTuple):
    """The levels one training step decodes, with what the device needs to know about them."""

    #: the prefix widths, increasing, the last one ``d_sae``
    widths: list[int]
    #: ``widths[:-1]`` on the device: where each latent group after the first begins
    bounds: torch.Tensor
    #: the weight of each level's loss, on the device (float32)
    weights: torch.Tensor

    @classmethod
    def build(
        cls, widths: Sequence[int], weights: Sequence[float] | None, device: torch.device
    ) -> LevelPlan:
        """A plan for ``widths``, weighted by ``weights`` (all 1 if None), on ``device``."""
        bounds = torch.tensor(list(widths[:-1]), dtype=torch.long, device=device)
        ones = [1.0] * len(widths)
        weight_tensor = torch.tensor(ones if weights is None else list(weights), device=device)
        return cls(list(widths), bounds, weight_tensor)

    def latent_multiplicity(self) -> torch.Tensor:
        """For every latent, the summed weight of the levels that contain it, ``[d_sae]``.

        A latent of group ``g`` is inside levels ``g, g + 1, ...``; penalising it
        once per containing level (weighted) matches the per-level reconstruction
        pressure it gets.
        """
        latents = torch.arange(self.widths[-1], device=self.bounds.device)
        group = torch.bucketize(latents, self.bounds, right=True)
        return self.weights.flip(0).cumsum(0).flip(0)[group]


class FixedLevels(nn.Module):
    """The paper's levels: the same widths, with the same weights, every step.

    Their plan is built once per device and kept, so that a step copies
    nothing from the host. (Not as buffers: SAELens builds SAEs on the meta
    device and loads only the saved tensors, and these follow from the config.)
    """

    def __init__(self, widths: Sequence[int], weights: Sequence[float] | None) -> None:
        super().__init__()
        self.widths = list(widths)
        self.weights = None if weights is None else list(weights)
        self._plans: dict[torch.device, LevelPlan] = {}

    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> FixedLevels:
        return cls(cfg.matryoshka_widths, cfg.level_weights)

    def evaluated(self, device: torch.device) -> LevelPlan:
        """The levels the saved SAE reports and logged metrics cover: ``matryoshka_widths``."""
        if device not in self._plans:
            self._plans[device] = LevelPlan.build(self.widths, self.weights, device)
        return self._plans[device]

    def step_plan(self, device: torch.device) -> LevelPlan:
        """The levels this training step decodes and trains."""
        return self.evaluated(device)

    def loss_terms(self, weighted_mse: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction terms of the loss, named for the progress bar and wandb."""
        terms = {"mse_loss": weighted_mse[-1]}
        for width, value in zip(self.widths[:-1], weighted_mse[:-1], strict=True):
            terms[f"inner_mse_loss_{width}"] = value
        return terms


class SampledLevels(FixedLevels):
    """Nabeshima's sampled prefixes: every step, ``n - 1`` distinct prefix lengths plus ``d_sae``.

    Lengths are drawn with ``P(l)`` proportional to ``l**power - (l - 1)**power``
    (:func:`pareto_prefix_probabilities`) by a private generator whose state is
    a buffer, saved in checkpoints, so a resumed run draws the same sequence.
    ``widths`` are only the levels the saved SAE reports and is evaluated at.
    Each step's weights are all 1.
    """

    prefix_rng_state: torch.Tensor

    def __init__(
        self,
        widths: Sequence[int],
        n_prefixes: int,
        power: float,
        seed: int,
    ) -> None:
        super().__init__(widths, None)
        self.n_prefixes = n_prefixes
        self._probabilities = pareto_prefix_probabilities(self.widths[-1], power)
        self.register_buffer("prefix_rng_state", torch.Generator().manual_seed(seed).get_state())

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> SampledLevels:
        return cls(
            cfg.matryoshka_widths,
            cfg.n_sampled_prefixes,
            cfg.pareto_power,
            cfg.prefix_sampling_seed,
        )

    @override
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # the generator lives on the CPU: keeping its state there spares every
        # step a copy from the device and back
        state = self.prefix_rng_state
        super()._apply(fn, recurse)
        self.prefix_rng_state = state
        return self

    @override
    def step_plan(self, device: torch.device) -> LevelPlan:
        generator = torch.Generator()
        generator.set_state(self.prefix_rng_state)
        widths = sample_prefix_widths(self._probabilities, self.n_prefixes, generator)
        self.prefix_rng_state.copy_(generator.get_state())
        # the sampled-prefix step's one copy to the device, its group bounds: from
        # pinned memory on CUDA, so that the host queues it and goes on (a copy from
        # pageable memory would wait for the device); the weights are made there
        bounds = torch.tensor(widths[:-1], dtype=torch.long)
        if device.type == "cuda":
            bounds = bounds.pin_memory()
        weights = torch.ones(len(widths), device=device)
        return LevelPlan(widths, bounds.to(device, non_blocking=True), weights)

    @override
    def loss_terms(self, weighted_mse: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse_loss": weighted_mse[-1], "sampled_prefixes_mse_loss": weighted_mse[:-1].sum()}


#: ``MatryoshkaTrainingSAEConfig.prefix_sampling`` -> how each step's levels are chosen
LEVEL_SCHEDULES: dict[str, type[FixedLevels]] = {"fixed": FixedLevels, "pareto": SampledLevels}


def training_levels(cfg: MatryoshkaTrainingSAEConfig) -> FixedLevels:
    """The level schedule ``cfg.prefix_sampling`` names."""
    return LEVEL_SCHEDULES[cfg.prefix_sampling].from_config(cfg)
