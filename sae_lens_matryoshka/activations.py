"""The activations of the training ``MatryoshkaTrainingSAE``: one object per activation, chosen once.

One activation is shared by every level: it selects the active latents once,
and each level decodes the part of that selection inside its prefix. As in
SAELens, the activation is the ``nn.Module`` that ``get_activation_fn`` returns.
Here it also owns everything else that differs between activations, so that
neither SAE class ever asks which activation it has:

- its selection: dense (``forward``) and, for the k-sparse ones, the
  ``(token, latent)`` entries the sparse training path works from (``select``);
- its sparsity penalty and that penalty's coefficient, which with
  ``target_l0`` it steers towards that L0 (``TargetL0``);
- its state (BatchTopK's threshold statistics, JumpReLU's thresholds, the
  target-L0 coefficient multiplier), kept in
  the precision it needs whatever the SAE's dtype (the SAEs save it under
  SAELens's names, ``threshold`` rather than ``activation_fn.threshold``);
- how it folds decoder norms and input scaling, and what it saves for inference.

They are named by ``MatryoshkaTrainingSAEConfig.activation``; which inference
activation (``inference_activations``) each saves as, and which are k-sparse,
is ``config.TRAINING_ACTIVATIONS``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from sae_lens.saes.sae import TrainCoefficientConfig
from torch import nn
from typing_extensions import Self, override

from sae_lens_matryoshka.collectives import SINGLE_PROCESS, Collectives
from sae_lens_matryoshka.encodings import Encoding, dense_only
from sae_lens_matryoshka.inference_activations import required_k, scale_with_folded_norms
from sae_lens_matryoshka.kernels.jumprelu import JumpReLUSTE, StepSTE, jumprelu
from sae_lens_matryoshka.kernels.selection import Selection
from sae_lens_matryoshka.levels import LevelPlan

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig


class TrainingActivation(nn.Module):
    """The activation of a ``MatryoshkaTrainingSAE``; by default stateless and unpenalised."""

    #: tensors kept in their own precision whatever the SAE's dtype (``.to`` moves
    #: them to a device only; loading keeps the saved precision)
    precise_state: ClassVar[tuple[str, ...]] = ()

    def _precise_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``precise_state`` this activation holds (some exist only when configured)."""
        held = {name: getattr(self, name, None) for name in self.precise_state}
        return {name: tensor for name, tensor in held.items() if tensor is not None}

    @override
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # `.data` holds on to the original storage, which conversion replaces
        kept = {name: tensor.data for name, tensor in self._precise_tensors().items()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            converted = getattr(self, name)
            if converted.dtype != before.dtype:
                converted.data = before.to(device=converted.device)
        return self

    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        raise NotImplementedError

    def step_forward(self, hidden_pre: torch.Tensor, collectives: Collectives) -> torch.Tensor:
        """The activations of a training step, where batch-global selection spans all replicas."""
        del collectives  # only batch-global selections use them
        return self(hidden_pre)

    def coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        """The penalty coefficients SAELens's trainer schedules (``l1`` / ``l0``)."""
        return {}

    def prepare_step(self) -> None:
        """Called before every training step's forward pass."""

    def select(
        self,
        hidden_pre: torch.Tensor,  # noqa: ARG002
        collectives: Collectives,  # noqa: ARG002
        count_on_host: bool,  # noqa: ARG002
    ) -> Selection:
        """The kept ``(token, latent)`` entries of ``hidden_pre [n_tokens, d_sae]``, token-major.

        Only k-sparse activations select; the others train on the dense path.
        ``count_on_host``: select exactly now, reading sizes back to the host
        if need be; else a selection may come back ``missed``, to be redone
        (``kernels.selection.Selection``).
        """
        raise TypeError(f"{type(self).__name__} is not k-sparse: it trains on the dense path only.")

    def sparsity_loss(
        self,
        encoding: Encoding,  # noqa: ARG002
        plan: LevelPlan,  # noqa: ARG002
        coefficients: dict[str, float],  # noqa: ARG002
    ) -> dict[str, torch.Tensor]:
        """The penalty terms of the loss, nested over this step's levels ``plan``."""
        return {}

    def update_from_step(
        self,
        encoding: Encoding,  # noqa: ARG002
        collectives: Collectives,  # noqa: ARG002
        step: int,  # noqa: ARG002
    ) -> dict[str, Any]:
        """Learn state from a finished step's activations (``step`` counts from 0); returns metrics."""
        return {}

    def why_nothing_fired(self, largest_pre_activation: float) -> str:  # noqa: ARG002
        """What in this activation's setting could explain a first batch on which nothing fired."""
        return ""

    def fold_scaling_factor(self, scaling_factor: float) -> None:
        """Activations (measured in unit-norm decoder units) shrank by ``scaling_factor``."""

    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        """Fold decoder norms into the encoder (``fold`` does it and returns the norms)."""
        fold()

    def to_inference(self, state_dict: dict[str, Any]) -> None:
        """Turn this activation's saved tensors into the inference activation's."""

    def prepare_loaded(self, state_dict: dict[str, Any]) -> None:
        """Undo SAELens's cast of every loaded tensor to the SAE dtype for ``precise_state``."""
        for name, tensor in self._precise_tensors().items():
            if name in state_dict:
                state_dict[name] = state_dict[name].to(tensor.dtype)


class KSparseActivation(TrainingActivation):
    """An activation that keeps ``k`` latents per token (on average for BatchTopK): TopK, BatchTopK."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    @override
    def step_forward(self, hidden_pre: torch.Tensor, collectives: Collectives) -> torch.Tensor:
        flat = hidden_pre.reshape(-1, hidden_pre.shape[-1])
        # the dense path has no later host read to share: it counts here
        token, latent, _ = self.select(flat.detach(), collectives, count_on_host=True)
        acts = torch.zeros_like(flat)
        acts[token, latent] = flat[token, latent].relu()
        return acts.view_as(hidden_pre)

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return self.step_forward(hidden_pre, SINGLE_PROCESS)

    @override
    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        raise NotImplementedError(
            "Folding W_dec norms changes which latents a top-k keeps unless the SAE was "
            "trained with rescale_acts_by_decoder_norm=True."
        )


class BatchTopK(KSparseActivation):
    """The ``k * n_tokens`` largest pre-activations of the batch (Bussmann et al. 2024).

    The selection spans the whole batch, so at inference it is replaced by a
    JumpReLU threshold. By default (``inference_threshold="last_batch"``) that
    is the cut-off of the most recent training batch (the smallest activation
    BatchTopK kept): exactly the threshold at which that batch fires ``k``
    latents per token, under weights one step old. An EMA of the cut-off (rate
    ``threshold_lr``, from step ``ema_start_step`` on), as SAELens and
    dictionary_learning keep it, lags by about ``1 / threshold_lr`` steps, far
    too long while activations still grow early in training; it is logged,
    and is the inference threshold with ``inference_threshold="ema"`` (the
    paper's code). In ``eval()`` mode the activation already uses the
    inference threshold, exactly as the saved SAE will.
    """

    precise_state: ClassVar[tuple[str, ...]] = ("topk_threshold", "last_cutoff")
    #: EMA of the cut-off, float64; negative until its first step
    topk_threshold: torch.Tensor
    #: the last training batch's cut-off, float64; negative until the first step
    last_cutoff: torch.Tensor

    def __init__(
        self,
        k: float,
        threshold_lr: float,
        device: torch.device,
        ema_start_step: int = 0,
        saves_ema: bool = False,
    ) -> None:
        super().__init__(k)
        self.threshold_lr = threshold_lr
        self.ema_start_step = ema_start_step
        #: whether the inference threshold is the EMA (else the last batch's cut-off)
        self.saves_ema = saves_ema
        # double precision: an EMA over many steps loses bits in float32
        for name in ("topk_threshold", "last_cutoff"):
            self.register_buffer(name, torch.tensor(-1.0, dtype=torch.double, device=device))

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        return cls(
            required_k(cfg),
            cfg.topk_threshold_lr,
            torch.device(cfg.device),
            cfg.topk_threshold_start_step,
            cfg.inference_threshold == "ema",
        )

    def _threshold(self, ema: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The inference threshold from the two cut-off statistics (0 before any step).

        The last batch's cut-off stands in for an EMA that has not started yet.
        """
        chosen = ema if self.saves_ema else last
        return torch.where(chosen >= 0, chosen, last).clamp(min=0.0)

    @property
    def jumprelu_threshold(self) -> torch.Tensor:
        """The JumpReLU threshold the saved SAE will use."""
        return self._threshold(self.topk_threshold, self.last_cutoff)

    @override
    def select(
        self, hidden_pre: torch.Tensor, collectives: Collectives, count_on_host: bool
    ) -> Selection:
        return collectives.batch_topk(hidden_pre, self.k, count_on_host)

    @override
    def step_forward(self, hidden_pre: torch.Tensor, collectives: Collectives) -> torch.Tensor:
        if self.training:
            return super().step_forward(hidden_pre, collectives)
        return jumprelu(hidden_pre, self.jumprelu_threshold.to(hidden_pre.dtype))

    @override
    @torch.no_grad()
    def update_from_step(
        self, encoding: Encoding, collectives: Collectives, step: int
    ) -> dict[str, Any]:
        kept = encoding.kept_values()
        ema, last = self.topk_threshold, self.last_cutoff
        # computed on the device, without a host synchronisation; a batch that
        # kept nothing (on every rank) changes nothing
        cutoff = kept.min().to(last.dtype) if kept.numel() else last.new_tensor(torch.inf)
        cutoff = collectives.minimum(cutoff)
        kept_any = torch.isfinite(cutoff)
        if step >= self.ema_start_step:
            learned = torch.where(ema < 0, cutoff, ema.lerp(cutoff, self.threshold_lr))
            ema.copy_(torch.where(kept_any, learned, ema))
        last.copy_(torch.where(kept_any, cutoff, last))
        return {"topk_threshold": ema, "jumprelu_threshold": self.jumprelu_threshold}

    @override
    @torch.no_grad()
    def fold_scaling_factor(self, scaling_factor: float) -> None:
        for threshold in (self.topk_threshold, self.last_cutoff):
            threshold.copy_(torch.where(threshold >= 0, threshold / scaling_factor, threshold))

    @override
    def prepare_loaded(self, state_dict: dict[str, Any]) -> None:
        if "topk_threshold" in state_dict:
            # checkpoints written before the calibration have only the EMA, which they saved
            state_dict.setdefault("last_cutoff", state_dict["topk_threshold"])
        super().prepare_loaded(state_dict)

    @override
    def to_inference(self, state_dict: dict[str, Any]) -> None:
        ema, last = state_dict.pop("topk_threshold"), state_dict.pop("last_cutoff")
        if float(last) < 0:
            warnings.warn(
                "saving a batchtopk SAE that never took a training step: its threshold was "
                "never learned and is saved as 0, so every positive pre-activation fires "
                "(about half the latents) instead of k per token.",
                stacklevel=4,
            )
        elif self.saves_ema and float(ema) < 0:
            warnings.warn(
                f"inference_threshold='ema', but the EMA starts at step {self.ema_start_step} "
                "(topk_threshold_start_step) and training stopped before it: the last "
                "batch's cut-off is saved instead.",
                stacklevel=4,
            )
        threshold = self._threshold(ema, last)
        state_dict["threshold"] = torch.full_like(state_dict["b_enc"], threshold.item())


class TopK(KSparseActivation):
    """Each token's ``k`` largest pre-activations, then ReLU; the same at inference."""

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        return cls(int(required_k(cfg)))

    @override
    def select(
        self, hidden_pre: torch.Tensor, collectives: Collectives, count_on_host: bool
    ) -> Selection:
        del count_on_host  # each token's k: static shapes, nothing to count
        return collectives.topk(hidden_pre, int(self.k))


class TargetL0(NamedTuple):
    """Steers a penalty's coefficient so that the activation fires ``target`` latents per token.

    After every step the coefficient's multiplier ``m`` becomes
    ``m * exp(rate * clamp(log(L0 / target), -1, 1))``, ``L0`` being the
    step's mean number of active latents per token. Why this form:

    - multiplicative (a step in ``log m``): the coefficient that gives a
      target L0 spans orders of magnitude across models, widths and targets,
      and L0 falls roughly as a power of the coefficient, so the same
      relative error should move the coefficient by the same relative amount
      whatever its scale; an additive step would crawl at large coefficients
      and overshoot at small ones.
    - integral: ``m`` accumulates the error, so it comes to rest where the
      L0 *is* the target (a step proportional to the error alone would leave
      an offset), and each batch's noisy L0 is averaged over about
      ``1 / rate`` steps.
    - bounded: the clamp lets the coefficient change by at most a factor
      ``exp(rate)`` per step. Early in training the L0 is orders of magnitude
      off (half the dictionary fires at initialisation) for reasons no
      coefficient fixes at once, and the weights need many steps to answer a
      change; an unbounded step would wind the coefficient far past where it
      belongs. Near the target the step is proportional to the relative
      error, so it settles instead of chattering by ``rate`` around it as a
      sign-only controller does.
    """

    target: float
    #: the largest change of ``log m`` in one step
    rate: float

    def next_multiplier(self, multiplier: torch.Tensor, l0: torch.Tensor) -> torch.Tensor:
        """The multiplier after a step that fired ``l0`` latents per token (on the device)."""
        # L0 = 0 gives log 0 = -inf, which the clamp turns into the largest decrease
        error = torch.log(l0.to(multiplier.dtype) / self.target).clamp(-1.0, 1.0)
        return multiplier * torch.exp(self.rate * error)


#: the saved name of a penalised activation's coefficient multiplier (only with ``target_l0``)
TARGET_L0_MULTIPLIER = "target_l0_multiplier"


class PenalisedActivation(TrainingActivation):
    """An activation made sparse by a penalty whose coefficient SAELens schedules: ReLU, JumpReLU.

    With ``target_l0`` (``control``), the penalty uses SAELens's scheduled
    coefficient (its warm-up included) times ``target_l0_multiplier``, which
    :class:`TargetL0` moves after every step once the warm-up is over (the low
    coefficient of the warm-up would wind it up). The multiplier is a float32
    buffer whatever the SAE dtype (``exp(0.001)`` rounds to 1 in bfloat16), so
    checkpoints save it and resuming continues from it; the inference SAE
    drops it. It is computed on the device without a host read, and logged.
    Without ``target_l0`` the activation has no such buffer.
    """

    precise_state: ClassVar[tuple[str, ...]] = (TARGET_L0_MULTIPLIER,)
    #: SAELens's name of the penalty's coefficient (``l1``, ``l0``)
    coefficient_name: ClassVar[str]
    #: the multiplier of the scheduled coefficient, float32; a buffer only with ``target_l0``
    target_l0_multiplier: torch.Tensor

    def __init__(
        self, coefficient: TrainCoefficientConfig, control: TargetL0 | None, device: torch.device
    ) -> None:
        super().__init__()
        self.coefficient = coefficient
        self.control = control
        if control is not None:
            multiplier = torch.ones((), dtype=torch.float32, device=device)
            self.register_buffer(TARGET_L0_MULTIPLIER, multiplier)

    @staticmethod
    def target_l0(cfg: MatryoshkaTrainingSAEConfig) -> TargetL0 | None:
        """The controller ``cfg`` asks for, if any."""
        return None if cfg.target_l0 is None else TargetL0(cfg.target_l0, cfg.target_l0_rate)

    @override
    def coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {self.coefficient_name: self.coefficient}

    def penalty_coefficient(self, coefficients: dict[str, float]) -> float | torch.Tensor:
        """This step's coefficient: SAELens's scheduled one, times the multiplier with ``target_l0``."""
        scheduled = coefficients[self.coefficient_name]
        # a new tensor: the loss's graph never holds the buffer the step then updates
        return scheduled if self.control is None else scheduled * self.target_l0_multiplier

    @override
    @torch.no_grad()
    def update_from_step(
        self, encoding: Encoding, collectives: Collectives, step: int
    ) -> dict[str, Any]:
        if self.control is None:
            return {}
        multiplier = self.target_l0_multiplier
        if step >= self.coefficient.warm_up_steps:
            fired = (dense_only(encoding).acts.detach() > 0).sum(dim=-1, dtype=torch.float32)
            # every data-parallel replica's tokens: the replicas keep one multiplier
            l0, _ = collectives.mean(fired.reshape(-1, 1))
            multiplier.copy_(self.control.next_multiplier(multiplier, l0[0]))
        return {TARGET_L0_MULTIPLIER: multiplier}

    @override
    def prepare_loaded(self, state_dict: dict[str, Any]) -> None:
        if self.control is not None:
            # a checkpoint written without target_l0 starts the controller at its coefficient
            state_dict.setdefault(TARGET_L0_MULTIPLIER, torch.ones((), dtype=torch.float32))
        elif TARGET_L0_MULTIPLIER in state_dict:
            multiplier = float(state_dict.pop(TARGET_L0_MULTIPLIER))
            warnings.warn(
                f"the checkpoint was trained with target_l0, which multiplied the "
                f"{self.coefficient_name} coefficient by {multiplier:.4g}; this SAE has "
                f"target_l0=None, so its penalty uses the scheduled {self.coefficient_name} "
                "coefficient alone.",
                stacklevel=4,
            )
        super().prepare_loaded(state_dict)

    @override
    def to_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict.pop(TARGET_L0_MULTIPLIER, None)


class JumpReLU(PenalisedActivation):
    """Learned per-latent thresholds, trained by straight-through estimators (as SAELens's JumpReLU).

    The penalty is the nested L0 ``sum_i c_i * [h_i > theta_i]`` (``c_i``: the
    summed weight of the levels containing latent ``i``). Thresholds stay
    float32 whatever the SAE dtype: Adam's small steps on an O(1) threshold
    round away in bfloat16.
    """

    precise_state: ClassVar[tuple[str, ...]] = ("threshold", TARGET_L0_MULTIPLIER)
    coefficient_name: ClassVar[str] = "l0"
    threshold: nn.Parameter

    def __init__(
        self,
        d_sae: int,
        init_threshold: float,
        bandwidth: float,
        l0: TrainCoefficientConfig,
        control: TargetL0 | None,
        device: torch.device,
    ) -> None:
        super().__init__(l0, control, device)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(
            torch.full((d_sae,), init_threshold, dtype=torch.float32, device=device)
        )

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        l0 = TrainCoefficientConfig(cfg.l0_coefficient, cfg.l0_warm_up_steps)
        return cls(
            cfg.d_sae,
            cfg.jumprelu_init_threshold,
            cfg.jumprelu_bandwidth,
            l0,
            cls.target_l0(cfg),
            torch.device(cfg.device),
        )

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        threshold = self.threshold.to(hidden_pre.dtype)
        return JumpReLUSTE.apply(hidden_pre, threshold, self.bandwidth)

    @override
    @torch.no_grad()
    def prepare_step(self) -> None:
        # projected rather than clamped in the graph, which would zero the
        # gradient of any threshold that reaches 0 (as SAELens does)
        self.threshold.clamp_(min=0.0)

    @override
    def sparsity_loss(
        self, encoding: Encoding, plan: LevelPlan, coefficients: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        hidden_pre = dense_only(encoding).hidden_pre
        fired = StepSTE.apply(hidden_pre, self.threshold.to(hidden_pre.dtype), self.bandwidth)
        per_token = (fired * plan.latent_multiplicity()).sum(dim=-1)
        return {"l0_loss": (self.penalty_coefficient(coefficients) * per_token).mean()}

    @override
    def why_nothing_fired(self, largest_pre_activation: float) -> str:
        lowest = self.threshold.min().item()
        if lowest < largest_pre_activation:
            return ""
        return (
            f"every latent's starting threshold (jumprelu_init_threshold, at least {lowest:.3g}) "
            "is above every pre-activation, and JumpReLU's threshold learns only from "
            f"pre-activations within jumprelu_bandwidth={self.bandwidth:g} of it. Start it below "
            "the pre-activations' scale (SAELens's default is 0.01, for activations normalised "
            "to norm sqrt(d_in))."
        )

    @override
    @torch.no_grad()
    def fold_scaling_factor(self, scaling_factor: float) -> None:
        self.threshold.div_(scaling_factor)

    @override
    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        scale_with_folded_norms(self.threshold, fold)

    @override
    def to_inference(self, state_dict: dict[str, Any]) -> None:
        super().to_inference(state_dict)
        state_dict["threshold"] = state_dict["threshold"].to(state_dict["b_enc"].dtype)


class ReLU(PenalisedActivation):
    """ReLU with the nested L1 penalty ``sum_i c_i * a_i * ||d_i||``.

    ``c_i`` is the summed weight of the levels containing latent ``i``, ``d_i``
    its decoder vector as used in decoding (unit norm when activations are
    measured in unit-norm decoder units).
    """

    coefficient_name: ClassVar[str] = "l1"

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        l1 = TrainCoefficientConfig(cfg.l1_coefficient, cfg.l1_warm_up_steps)
        return cls(l1, cls.target_l0(cfg), torch.device(cfg.device))

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return hidden_pre.relu()

    @override
    def sparsity_loss(
        self, encoding: Encoding, plan: LevelPlan, coefficients: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        dense = dense_only(encoding)
        magnitude = dense.decoder.l1_magnitude(dense.acts, dense.decoder_norms)
        per_token = (magnitude.abs() * plan.latent_multiplicity()).sum(dim=-1)
        return {"l1_loss": (self.penalty_coefficient(coefficients) * per_token).mean()}


#: ``MatryoshkaTrainingSAEConfig.activation`` -> its class (``config.TRAINING_ACTIVATIONS``: its kind)
TRAINING_ACTIVATION_CLASSES: dict[str, type[TrainingActivation]] = {
    "batchtopk": BatchTopK,
    "topk": TopK,
    "jumprelu": JumpReLU,
    "relu": ReLU,
}


def training_activation(cfg: MatryoshkaTrainingSAEConfig) -> TrainingActivation:
    """The activation ``cfg`` names."""
    return TRAINING_ACTIVATION_CLASSES[cfg.activation].from_config(cfg)
