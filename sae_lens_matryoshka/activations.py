"""The activations of the training ``MatryoshkaTrainingSAE``: one object per activation, chosen once.

One activation is shared by every level: it selects the active latents once,
and each level decodes the part of that selection inside its prefix. As in
SAELens, the activation is the ``nn.Module`` that ``get_activation_fn`` returns.
Here it also owns everything else that differs between activations, so that
neither SAE class ever asks which activation it has:

- its selection: dense (``forward``) and, for the k-sparse ones, the
  ``(token, latent)`` entries the sparse training path works from (``select``);
- its sparsity penalty and that penalty's coefficient;
- its state (BatchTopK's threshold statistics, JumpReLU's thresholds), kept in
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
from typing import TYPE_CHECKING, Any, ClassVar

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

    @override
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        # `.data` holds on to the original storage, which conversion replaces
        kept = {name: getattr(self, name).data for name in self.precise_state}
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

    def fold_scaling_factor(self, scaling_factor: float) -> None:
        """Activations (measured in unit-norm decoder units) shrank by ``scaling_factor``."""

    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        """Fold decoder norms into the encoder (``fold`` does it and returns the norms)."""
        fold()

    def to_inference(self, state_dict: dict[str, Any]) -> None:
        """Turn this activation's saved tensors into the inference activation's."""

    def prepare_loaded(self, state_dict: dict[str, Any]) -> None:
        """Undo SAELens's cast of every loaded tensor to the SAE dtype for ``precise_state``."""
        for name in self.precise_state:
            if name in state_dict:
                state_dict[name] = state_dict[name].to(getattr(self, name).dtype)


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


class JumpReLU(TrainingActivation):
    """Learned per-latent thresholds, trained by straight-through estimators (as SAELens's JumpReLU).

    The penalty is the nested L0 ``sum_i c_i * [h_i > theta_i]`` (``c_i``: the
    summed weight of the levels containing latent ``i``). Thresholds stay
    float32 whatever the SAE dtype: Adam's small steps on an O(1) threshold
    round away in bfloat16.
    """

    precise_state: ClassVar[tuple[str, ...]] = ("threshold",)
    threshold: nn.Parameter

    def __init__(
        self,
        d_sae: int,
        init_threshold: float,
        bandwidth: float,
        l0: TrainCoefficientConfig,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.bandwidth = bandwidth
        self.l0 = l0
        self.threshold = nn.Parameter(
            torch.full((d_sae,), init_threshold, dtype=torch.float32, device=device)
        )

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        l0 = TrainCoefficientConfig(cfg.l0_coefficient, cfg.l0_warm_up_steps)
        device = torch.device(cfg.device)
        return cls(cfg.d_sae, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth, l0, device)

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        threshold = self.threshold.to(hidden_pre.dtype)
        return JumpReLUSTE.apply(hidden_pre, threshold, self.bandwidth)

    @override
    def coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l0": self.l0}

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
        return {"l0_loss": (coefficients["l0"] * per_token).mean()}

    @override
    @torch.no_grad()
    def fold_scaling_factor(self, scaling_factor: float) -> None:
        self.threshold.div_(scaling_factor)

    @override
    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        scale_with_folded_norms(self.threshold, fold)

    @override
    def to_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict["threshold"] = state_dict["threshold"].to(state_dict["b_enc"].dtype)


class ReLU(TrainingActivation):
    """ReLU with the nested L1 penalty ``sum_i c_i * a_i * ||d_i||``.

    ``c_i`` is the summed weight of the levels containing latent ``i``, ``d_i``
    its decoder vector as used in decoding (unit norm when activations are
    measured in unit-norm decoder units).
    """

    def __init__(self, l1: TrainCoefficientConfig) -> None:
        super().__init__()
        self.l1 = l1

    @override
    @classmethod
    def from_config(cls, cfg: MatryoshkaTrainingSAEConfig) -> Self:
        return cls(TrainCoefficientConfig(cfg.l1_coefficient, cfg.l1_warm_up_steps))

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return hidden_pre.relu()

    @override
    def coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l1": self.l1}

    @override
    def sparsity_loss(
        self, encoding: Encoding, plan: LevelPlan, coefficients: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        dense = dense_only(encoding)
        magnitude = dense.decoder.l1_magnitude(dense.acts, dense.decoder_norms)
        per_token = (magnitude.abs() * plan.latent_multiplicity()).sum(dim=-1)
        return {"l1_loss": (coefficients["l1"] * per_token).mean()}


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
