"""Latents kept in order of how often they fire, as Nabeshima's Matryoshka SAEs keep them.

A Matryoshka SAE asks its early latents to reconstruct on their own, so they
should be its most general features, and general features fire most often.
Training does not keep them in that order by itself: a latent's position
only says which prefixes train it. Ordering by firing frequency puts the
latents every prefix should hold first, and makes a saved dictionary's
index meaningful (``sae.truncate(m)`` keeps the ``m`` most frequent).

What may move where follows from the level structure (:func:`ordering_bounds`):

- sampled prefixes (``prefix_sampling="pareto"``): the order is global. A
  latent's position is exactly what the sampler trains it by (the shorter
  prefixes it sits in, the more often it must reconstruct alone), and
  moving the frequent latents forward is the point of the ordering: the
  objective changes, by design, to give them the pressure they need.
- fixed widths: each group between two widths is ordered on its own. A
  global order would move latents between levels: a frequent but specific
  latent of the last group would land in the first level, which it was not
  trained to serve, and the paper's objective (a fixed set of latents per
  level) would change under the run. Within a group every latent is in
  exactly the same levels, so a permutation changes nothing a step computes:
  the ordered run *is* the unordered run, relabelled.

A permutation moves everything that belongs to a latent together
(:func:`permute_latents`): its encoder column (``W_enc[:, perm]``), decoder
row (``W_dec[perm]``), ``b_enc``, the activation's per-latent state (JumpReLU's
``threshold``), the optimizer's per-parameter state (Adam's ``exp_avg`` and
``exp_avg_sq``) and any other per-latent statistic it is given (SAELens's
trainer's ``act_freq_scores`` and ``n_forward_passes_since_fired``, which pick
the dead latents). Permuted in place, so the optimizer's references to the
parameters, the unit-norm decoder's gradient hook and checkpoints all stay
valid; one extra copy of the largest tensor at a time.

Two ways in:

- :func:`order_latents` orders any Matryoshka SAE by frequencies it is given
  (firing counts, probabilities, SAELens's log10 ``sparsity.safetensors``: only
  their order matters) and returns the permutation, e.g. a trained SAE once
  before saving it. Saving writes the ordered SAE as it is.
- with ``order_latents_every`` set, :func:`install` (called when the plugin
  registers) makes SAELens's trainer order the SAE every that many steps and
  once more after the last step, before it saves anything: the final
  checkpoint, the saved SAE and its ``sparsity.safetensors`` are ordered, and
  all three agree. See :class:`TrainerOrdering` for the counts it ranks by.
  Its state between two orderings (the counts so far, the last interval's
  counts, the composed permutation) is written into every checkpoint
  (``STATE_FILE``) and read back on resume, so a resumed run orders exactly
  as the uninterrupted one.

Latent sharding cannot be ordered: a global order would exchange latents,
their optimizer state and the trainer's statistics between the ranks that
hold them (an all-to-all of ``W_enc`` columns and ``W_dec`` rows), and a
within-shard order would not be the order this module promises. It is
refused when a shard is built (``MatryoshkaTrainingSAE.build_shard``) and
here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import load_file, save_file
from torch import nn

from sae_lens_matryoshka.collectives import SINGLE_PROCESS, Collectives
from sae_lens_matryoshka.config import trains_matryoshka

#: the trainer attribute holding a run's :class:`TrainerOrdering`
TRAINER_ATTRIBUTE = "matryoshka_latent_order"
#: the file of a checkpoint holding its run's :class:`TrainerOrdering` state
STATE_FILE = "latent_order_state.safetensors"


def ordering_bounds(cfg: Any) -> list[int]:
    """Where the blocks a latent may be reordered within end: ``[d_sae]`` or the widths.

    Global (``[d_sae]``) for sampled prefixes; each fixed level's group
    otherwise, which is also what an inference config (no ``prefix_sampling``)
    gets: reordering within groups never moves a latent out of the levels it
    was saved in. See the module's docstring for why.
    """
    if getattr(cfg, "prefix_sampling", "fixed") == "pareto":
        return [cfg.d_sae]
    return list(cfg.matryoshka_widths)


def frequency_order(frequencies: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """The permutation putting each block's latents in non-increasing order of ``frequencies``.

    ``perm[i]`` is the latent that moves to position ``i``; latents never
    leave their block (``[0, bounds[0])``, ``[bounds[0], bounds[1])``, ...).
    Ties keep their current order (a stable sort), so ordering an ordered SAE
    changes nothing, and never-firing latents stay in the order they had.
    Computed on ``frequencies``' device, without a host read.
    """
    pieces, start = [], 0
    for stop in bounds:
        block = frequencies[start:stop]
        pieces.append(torch.sort(block, descending=True, stable=True).indices + start)
        start = stop
    return torch.cat(pieces)


def latent_tensors(sae: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """Every tensor of ``sae`` indexed by latent: ``(name, tensor, latent dimension)``.

    Parameters by rule, so that a parameter added later cannot be forgotten
    silently: ``W_enc`` runs over latents in its columns, ``b_dec`` is shared,
    and every other parameter must lead with ``d_sae`` (``W_dec``, ``b_enc``,
    JumpReLU's ``threshold``) or this refuses it. Buffers are per-latent only
    where the activation holds floating ones of shape ``[d_sae]`` (none do
    today: BatchTopK's threshold statistics and the target-L0 multiplier are
    scalars, the prefix sampler's state is the generator's bytes).
    """
    d_sae = _d_sae(sae)
    found: list[tuple[str, torch.Tensor, int]] = []
    for name, parameter in sae.named_parameters():
        if name == "b_dec":
            continue
        dimension = 1 if name == "W_enc" else 0
        if parameter.dim() <= dimension or parameter.shape[dimension] != d_sae:
            raise NotImplementedError(
                f"latent ordering does not know how the parameter {name!r} of shape "
                f"{tuple(parameter.shape)} runs over the {d_sae} latents; it would be left "
                "behind by a permutation."
            )
        found.append((name, parameter, dimension))
    for name, buffer in sae.named_buffers():
        floating = buffer.is_floating_point()
        if name.startswith("activation_fn.") and floating and buffer.shape == (d_sae,):
            found.append((name, buffer, 0))
    return found


def _d_sae(sae: nn.Module) -> int:
    return int(cast(Any, sae).cfg.d_sae)


def _permute_(tensor: torch.Tensor, perm: torch.Tensor, dimension: int) -> None:
    """``tensor`` reindexed along ``dimension`` by ``perm``, in place (its identity kept)."""
    tensor.copy_(tensor.index_select(dimension, perm.to(tensor.device)))


@torch.no_grad()
def permute_latents(
    sae: nn.Module,
    perm: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    statistics: Sequence[torch.Tensor] = (),
) -> None:
    """Move latent ``perm[i]`` to position ``i``, with everything that belongs to it.

    The SAE's per-latent tensors (:func:`latent_tensors`) and their gradients,
    ``optimizer``'s state for them (every state tensor of a parameter's shape:
    Adam's ``exp_avg``, ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``; scalars
    such as ``step`` are shared) and ``statistics`` (tensors ``[d_sae, ...]``,
    e.g. the trainer's firing counts), all in place.
    """
    part = getattr(sae, "latent_part", None)
    if part is not None and not part.is_whole:
        raise ValueError(
            f"latent ordering cannot reorder a latent-sharded SAE ({part.name}): the "
            "permutation would move latents between ranks. Train without "
            "order_latents_every, then order the saved SAE with order_latents."
        )
    for name, tensor, dimension in latent_tensors(sae):
        _permute_(tensor, perm, dimension)
        if tensor.grad is not None:
            _permute_(tensor.grad, perm, dimension)
        state = {} if optimizer is None else optimizer.state.get(tensor, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if value.shape != tensor.shape:
                raise NotImplementedError(
                    f"latent ordering does not know how the optimizer's state {key!r} of "
                    f"shape {tuple(value.shape)} runs over the latents of {name!r} "
                    f"{tuple(tensor.shape)}."
                )
            _permute_(value, perm, dimension)
    for statistic in statistics:
        _permute_(statistic, perm, 0)


def order_latents(
    sae: nn.Module,
    frequencies: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    statistics: Sequence[torch.Tensor] = (),
    bounds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Order ``sae``'s latents by ``frequencies``, most frequent first; returns the permutation.

    Usable on a trained ``MatryoshkaTrainingSAE`` (then save it: the saved
    ``MatryoshkaSAE`` is the ordered one) or a ``MatryoshkaSAE``.

    Args:
        sae: the SAE, permuted in place.
        frequencies: ``[d_sae]``, one number per latent in its current order:
            firing counts or probabilities, or anything monotone in them (the
            log10 sparsity SAELens saves). Only their order is used.
        optimizer: an optimizer training ``sae``, whose per-parameter state
            moves with the latents (to continue training after ordering).
        statistics: further ``[d_sae, ...]`` tensors to permute in place.
        bounds: the ends of the blocks latents are ordered within; default
            :func:`ordering_bounds` (global for sampled prefixes, within each
            group of fixed widths).

    Returns:
        ``perm``: the latent now at position ``i`` was at ``perm[i]``, so
        ``W_dec_after = W_dec_before[perm]``. ``frequencies[perm]`` is
        non-increasing within each block.
    """
    d_sae = _d_sae(sae)
    if not isinstance(frequencies, torch.Tensor) or frequencies.shape != (d_sae,):
        shape = tuple(frequencies.shape) if isinstance(frequencies, torch.Tensor) else None
        raise ValueError(
            f"frequencies must be a tensor of shape ({d_sae},), one per latent; got "
            f"{type(frequencies).__name__} of shape {shape}."
        )
    if frequencies.is_complex() or not bool(torch.isfinite(frequencies.float()).all()):
        raise ValueError("frequencies must be real and finite (NaN would order arbitrarily).")
    bounds = ordering_bounds(sae.cfg) if bounds is None else list(bounds)
    increasing = all(a < b for a, b in zip([0, *bounds], bounds, strict=False))
    if not bounds or not increasing or bounds[-1] != d_sae:
        raise ValueError(
            f"bounds must be strictly increasing positive ends of blocks, the last d_sae={d_sae}; "
            f"got {bounds!r}."
        )
    perm = frequency_order(frequencies.to(cast(Any, sae).W_dec.device), bounds)
    permute_latents(sae, perm, optimizer, statistics)
    return perm


class FrequencyWindow:
    """Each latent's firing count since the last ordering, read off SAELens's trainer.

    SAELens's trainer counts how often each latent fires in
    ``act_freq_scores``, on the device, and starts a new count (a new tensor)
    every ``feature_sampling_window`` steps. Reading the count since the last
    ordering from it costs nothing per step: the count's value at the last
    ordering is kept (``baseline``), and when the trainer starts a new tensor
    the finished one (still referenced here, its last value complete) is added
    to ``carry``. No host read, no per-step device work.

    On resume, :meth:`resume` starts it from the counts a checkpoint saved.
    The counts are whole numbers held in float32, exact up to 2**24 firings
    of one latent between two orderings; past that the order may differ from
    an uninterrupted run's by a rounding.
    """

    def __init__(self) -> None:
        #: the trainer's count tensor last seen
        self._seen: torch.Tensor | None = None
        #: its value at the last ordering (``None``: 0, it started after)
        self._baseline: torch.Tensor | None = None
        #: the counts of the trainer's finished windows since the last ordering
        self._carry: torch.Tensor | None = None

    def observe(self, scores: torch.Tensor) -> None:
        """Note the trainer's count tensor; a new one means the last one's window has ended."""
        if scores is self._seen:
            return
        if self._seen is not None:
            finished = self._seen if self._baseline is None else self._seen - self._baseline
            self._carry = finished.clone() if self._carry is None else self._carry + finished
        self._seen, self._baseline = scores, None

    def counts(self) -> torch.Tensor:
        """The counts since the last ordering (``observe`` must have seen the trainer's)."""
        assert self._seen is not None
        counts = self._seen.clone() if self._baseline is None else self._seen - self._baseline
        return counts if self._carry is None else counts + self._carry

    def restart(self) -> None:
        """Start counting anew: called right after an ordering (the trainer's count permuted)."""
        assert self._seen is not None
        self._baseline, self._carry = self._seen.clone(), None

    @property
    def started(self) -> bool:
        """Whether it has seen the trainer's count (a step ran, or a checkpoint resumed it)."""
        return self._seen is not None

    def resume(self, scores: torch.Tensor, counts: torch.Tensor) -> None:
        """Continue from a checkpoint: ``counts`` so far, the trainer's restored count ``scores``."""
        self._seen, self._baseline, self._carry = scores, scores.clone(), counts.to(scores)


class TrainerOrdering:
    """The ordering of one SAELens trainer's Matryoshka SAE, every ``every`` steps and at the end.

    Every ``every`` completed steps the latents are ordered by their firing
    counts over those steps (:class:`FrequencyWindow`); after the last step
    (the trainer's ``total_training_samples`` reached) once more, before the
    trainer saves its final checkpoint and the runner the SAE. If that last
    stretch is shorter than ``every`` steps its counts are added to the
    previous interval's, so the final order never rests on a few batches.

    Data-parallel replicas sum their counts (``sae.collectives.sum``) and so
    apply the same permutation. ``permutation`` composes every ordering of
    this trainer: the SAE's latent ``i`` is the one that started at
    ``permutation[i]``.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.window = FrequencyWindow()
        #: the counts the last ordering ranked by, in the order it made
        self.last_counts: torch.Tensor | None = None
        #: every ordering so far, composed (``None`` before the first)
        self.permutation: torch.Tensor | None = None
        self.n_orderings = 0
        self._steps_since = 0

    @classmethod
    def of(cls, trainer: SAETrainer[Any, Any]) -> TrainerOrdering | None:
        """The trainer's ordering, made on first use; ``None`` if its SAE is not to be ordered."""
        if not trains_matryoshka(trainer):
            return None
        every = getattr(trainer.sae.cfg, "order_latents_every", 0)
        if not every:
            return None
        ordering: TrainerOrdering | None = getattr(trainer, TRAINER_ATTRIBUTE, None)
        if ordering is None or ordering.every != every:
            ordering = cls(every)
            setattr(trainer, TRAINER_ATTRIBUTE, ordering)
        return ordering

    def after_step(self, trainer: SAETrainer[Any, Any]) -> None:
        """Called after each training step: order the SAE if this step ends an interval or the run."""
        self.window.observe(trainer.act_freq_scores)
        self._steps_since += 1
        completed = trainer.n_training_steps + 1  # the trainer counts the step after this
        last = trainer.n_training_samples >= trainer.cfg.total_training_samples
        if completed % self.every == 0:
            counts = self.window.counts()
        elif last:
            counts = self.window.counts()
            if self._steps_since < self.every and self.last_counts is not None:
                counts = counts + self.last_counts
        else:
            return
        self.order(trainer, counts)

    def save(self, path: Path) -> None:
        """Write the state a resumed run continues from (nothing before the first step)."""
        if not self.window.started:
            return
        state = {
            "counts": self.window.counts(),
            "steps_since": torch.tensor(self._steps_since),
            "n_orderings": torch.tensor(self.n_orderings),
        }
        if self.last_counts is not None:
            state["last_counts"] = self.last_counts
        if self.permutation is not None:
            state["permutation"] = self.permutation
        save_file({name: value.contiguous() for name, value in state.items()}, path)

    def resume(self, trainer: SAETrainer[Any, Any], path: Path) -> None:
        """Continue from the state :meth:`save` wrote, with the trainer's restored statistics."""
        state = load_file(path, device=str(trainer.act_freq_scores.device))
        self.window.resume(trainer.act_freq_scores, state["counts"])
        self._steps_since = int(state["steps_since"])
        self.n_orderings = int(state["n_orderings"])
        self.last_counts = state.get("last_counts")
        self.permutation = state.get("permutation")

    def order(self, trainer: SAETrainer[Any, Any], counts: torch.Tensor) -> None:
        """Order the trainer's SAE by ``counts`` (this replica's), with its optimizer and statistics."""
        sae = trainer.sae
        collectives: Collectives = getattr(sae, "collectives", SINGLE_PROCESS)
        counts = collectives.sum(counts)  # every replica: one permutation
        perm = frequency_order(counts, ordering_bounds(sae.cfg))
        statistics = (trainer.act_freq_scores, trainer.n_forward_passes_since_fired)
        permute_latents(sae, perm, trainer.optimizer, statistics)
        self.last_counts = counts[perm]
        self.permutation = perm if self.permutation is None else self.permutation[perm]
        self.window.restart()
        self._steps_since = 0
        self.n_orderings += 1


def install() -> None:
    """Make SAELens's trainer order a Matryoshka SAE's latents when its config asks. Idempotent.

    Wraps the trainer's step (the ordering itself) and its state's saving and
    loading (the ordering's state in each checkpoint).
    """
    if getattr(SAETrainer, "_matryoshka_latent_order", False):
        return
    train_step = SAETrainer._train_step
    save_state = SAETrainer.save_trainer_state
    load_state = SAETrainer.load_trainer_state

    @functools.wraps(train_step)
    def _train_step(self: SAETrainer[Any, Any], *args: Any, **kwargs: Any) -> TrainStepOutput:
        output = train_step(self, *args, **kwargs)
        ordering = TrainerOrdering.of(self)
        if ordering is not None:
            # after the optimizer step, before the trainer logs, checkpoints or saves
            ordering.after_step(self)
        return output

    @functools.wraps(save_state)
    def save_trainer_state(self: SAETrainer[Any, Any], checkpoint_path: Path) -> None:
        save_state(self, checkpoint_path)
        ordering = TrainerOrdering.of(self)
        if ordering is not None:
            ordering.save(Path(checkpoint_path) / STATE_FILE)

    @functools.wraps(load_state)
    def load_trainer_state(self: SAETrainer[Any, Any], checkpoint_path: Path | str) -> None:
        load_state(self, checkpoint_path)
        ordering = TrainerOrdering.of(self)
        saved = Path(checkpoint_path) / STATE_FILE
        # a checkpoint from a run without ordering: the window starts at the resume
        if ordering is not None and saved.exists():
            ordering.resume(self, saved)

    SAETrainer._train_step = _train_step
    SAETrainer.save_trainer_state = save_trainer_state
    SAETrainer.load_trainer_state = load_trainer_state
    SAETrainer._matryoshka_latent_order = True
