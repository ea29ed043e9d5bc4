"""The training class of the ``"matryoshka"`` architecture.

``MatryoshkaTrainingSAE`` plugs into SAELens's ``SAETrainer`` and
``LanguageModelSAETrainingRunner`` like any built-in architecture: the runner
builds it from a ``MatryoshkaTrainingSAEConfig``, calls
``training_forward_pass`` every step, checkpoints it with ``save_model`` and
saves the final dictionary with ``save_inference_model`` as a ``MatryoshkaSAE``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.loading.pretrained_sae_loaders import PretrainedSaeDiskLoader
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_lens_matryoshka import distributed
from sae_lens_matryoshka.activations import JumpReLUSTE, StepSTE, batch_topk, jumprelu, topk
from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.levels import (
    decode_levels,
    latent_level_weights,
    pareto_prefix_probabilities,
    sample_prefix_widths,
)
from sae_lens_matryoshka.losses import (
    aux_k,
    dead_latent_loss,
    dead_latent_mse,
    level_metrics,
    level_mse,
)
from sae_lens_matryoshka.safe_loading import check_finite_weights, keep_threshold_precision
from sae_lens_matryoshka.sparse_kernels import (
    bag_sum,
    batch_topk_indices,
    dead_topk_indices,
    decode_levels_sparse,
    dense_acts,
    encoder_values,
    topk_indices,
)


@dataclass
class _SparseBatch:
    """A batch on the sparse path: what encoding leaves for decoding and the aux loss."""

    #: the processed input, ``[n_tokens, d_in]``; its gradient reaches ``b_dec``
    sae_in: torch.Tensor
    #: pre-activations in activation units (times decoder norms if rescaled), no gradient
    hidden_pre: torch.Tensor
    #: ``||W_dec_j||`` with gradient, when activations are measured in unit-norm units
    norms: torch.Tensor | None
    #: the active entries: token and latent ids, and their activations (with gradient)
    token: torch.Tensor
    latent: torch.Tensor
    acts: torch.Tensor


class MatryoshkaTrainingSAE(TrainingSAE[MatryoshkaTrainingSAEConfig]):
    """A Matryoshka SAE under training.

    Every step encodes once, applies one activation (shared by all levels),
    and decodes every level in a single cumulative pass. The loss is the
    weighted sum of the levels' MSEs, the activation's sparsity penalty (L1 for
    relu, L0 for jumprelu, both nested by level) and the dead-latent auxiliary loss.

    In ``train()`` mode a batchtopk SAE selects with BatchTopK; in ``eval()``
    mode it uses the JumpReLU threshold learned so far, exactly what the saved
    ``MatryoshkaSAE`` computes, so evals during training measure the
    dictionary that will be shipped. Other activations behave the same in
    both modes.
    """

    b_enc: nn.Parameter
    #: (jumprelu) learned per-latent thresholds, kept in float32 as SAELens does
    threshold: nn.Parameter
    #: (batchtopk) EMA of the smallest kept activation; negative until the first step
    topk_threshold: torch.Tensor
    #: (pareto) the prefix sampler's generator state, saved with checkpoints
    prefix_rng_state: torch.Tensor

    def __init__(self, cfg: MatryoshkaTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        #: one replica of a data-parallel SAE (set by ``distributed.prepare_data_parallel``)
        self.data_parallel = False
        # true only inside a data-parallel training step: every rank runs the same
        # collectives there, while encode() may run on one rank alone (evals)
        self._collective_step = False
        if cfg.activation == "batchtopk":
            self.register_buffer(
                "topk_threshold",
                # double precision: an EMA over many steps loses bits in float32
                torch.tensor(-1.0, dtype=torch.double, device=self.W_dec.device),
            )
        if cfg.activation == "jumprelu":
            # float32 whatever the SAE dtype: Adam's small steps on an O(1)
            # threshold round away in bfloat16
            self.threshold = nn.Parameter(
                torch.full(
                    (cfg.d_sae,),
                    cfg.jumprelu_init_threshold,
                    dtype=torch.float32,
                    device=self.device,
                )
            )
        if cfg.prefix_sampling == "pareto":
            self._prefix_probabilities = pareto_prefix_probabilities(cfg.d_sae, cfg.pareto_power)
            generator = torch.Generator().manual_seed(cfg.prefix_sampling_seed)
            self.register_buffer("prefix_rng_state", generator.get_state())

    @override
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> MatryoshkaTrainingSAE:
        # `.to(dtype)` would round the EMA threshold (double) and the JumpReLU
        # thresholds (float32) to the parameters' dtype; they follow the device only.
        # `.data` holds on to the original storage, which conversion replaces
        kept = {
            name: tensor.data
            for name, tensor in [*self._buffers.items(), *self._parameters.items()]
            if name in ("topk_threshold", "threshold") and tensor is not None
        }
        super()._apply(fn, recurse)
        for name, before in kept.items():
            current = getattr(self, name)
            if current.dtype != before.dtype:
                current.data = before.to(device=current.device)
        return self

    @property
    def matryoshka_widths(self) -> list[int]:
        return self.cfg.matryoshka_widths

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._activate

    def _activate(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        activation = self.cfg.activation
        if activation == "batchtopk":
            if self._collective_step:
                token, latent = distributed.global_batch_topk_indices(
                    hidden_pre.detach(),
                    self.cfg.k,  # type: ignore[arg-type]
                )
                acts = torch.zeros_like(hidden_pre)
                acts[token, latent] = hidden_pre[token, latent]
                return acts
            if self.training:
                return batch_topk(hidden_pre, self.cfg.k)  # type: ignore[arg-type]
            return jumprelu(hidden_pre, self.inference_threshold.to(hidden_pre.dtype))
        if activation == "topk":
            return topk(hidden_pre, int(self.cfg.k))  # type: ignore[arg-type]
        if activation == "jumprelu":
            threshold = self.threshold.to(hidden_pre.dtype)
            return JumpReLUSTE.apply(hidden_pre, threshold, self.cfg.jumprelu_bandwidth)  # type: ignore[no-any-return]
        return hidden_pre.relu()

    @property
    def inference_threshold(self) -> torch.Tensor:
        """(batchtopk) The JumpReLU threshold the saved SAE will use (0 before any step)."""
        return self.topk_threshold.clamp(min=0.0)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.activation == "relu":
            return {
                "l1": TrainCoefficientConfig(self.cfg.l1_coefficient, self.cfg.l1_warm_up_steps)
            }
        if self.cfg.activation == "jumprelu":
            return {
                "l0": TrainCoefficientConfig(self.cfg.l0_coefficient, self.cfg.l0_warm_up_steps)
            }
        return {}

    def _decoder_scale(self) -> torch.Tensor | None:
        """``1 / ||W_dec_i||`` when activations are measured in unit-norm decoder units."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return 1 / self.W_dec.norm(dim=-1)
        return None

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
        feature_acts = self.hook_sae_acts_post(self.activation_fn(hidden_pre))
        return feature_acts, hidden_pre

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        scale = self._decoder_scale()
        if scale is not None:
            feature_acts = feature_acts * scale
        sae_out_pre = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    def decode_levels(
        self,
        feature_acts: torch.Tensor,
        widths: list[int] | None = None,
        eval_widths: list[int] | None = None,
    ) -> torch.Tensor:
        """Reconstructions of every level, shape ``[n_levels, *batch, d_in]``.

        Level ``l`` decodes only latents ``< widths[l]`` (default
        ``matryoshka_widths``); the last level equals ``decode(feature_acts)``.
        One cumulative decode, with ``detach_between_levels`` applied.
        ``eval_widths`` appends, without gradient, the levels at other widths:
        the activation normalisation's inverse can only run once per input.
        """
        scale = self._decoder_scale()
        if scale is not None:
            feature_acts = feature_acts * scale
        levels = decode_levels(
            feature_acts,
            self.W_dec,
            self.b_dec,
            self.matryoshka_widths if widths is None else widths,
            self.cfg.detach_between_levels,
        )
        if eval_widths is not None:
            with torch.no_grad():
                extra = decode_levels(feature_acts, self.W_dec, self.b_dec, eval_widths)
            levels = torch.cat([levels, extra])
        return self.run_time_activation_norm_fn_out(levels)

    def step_widths(self) -> list[int]:
        """This step's levels: the fixed widths, or freshly sampled prefixes."""
        if self.cfg.prefix_sampling == "fixed":
            return self.matryoshka_widths
        generator = torch.Generator()
        generator.set_state(self.prefix_rng_state.cpu())
        widths = sample_prefix_widths(
            self._prefix_probabilities, self.cfg.n_sampled_prefixes, generator
        )
        self.prefix_rng_state.copy_(generator.get_state())
        return widths

    def _level_weights(self, n_levels: int, like: torch.Tensor) -> torch.Tensor:
        weights = self.cfg.level_weights
        if weights is None:
            return like.new_ones(n_levels)
        return like.new_tensor(weights)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._collective_step = self.training and self.data_parallel
        try:
            return self._training_step(step_input)
        finally:
            self._collective_step = False

    def _training_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        _check_finite(step_input.sae_in, step_input.n_training_steps)
        if self._collective_step and step_input.dead_neuron_mask is not None:
            step_input = dataclasses.replace(
                step_input,
                dead_neuron_mask=distributed.global_dead_mask(step_input.dead_neuron_mask),
            )
        if self.cfg.activation == "jumprelu":
            # projected rather than clamped in the graph, which would zero the
            # gradient of any threshold that reaches 0 (as SAELens does)
            with torch.no_grad():
                self.threshold.clamp_(min=0.0)
        sae_in = step_input.sae_in
        widths = self.step_widths()
        sampled = self.cfg.prefix_sampling != "fixed"
        eval_widths = self.matryoshka_widths if sampled and step_input.is_logging_step else None

        sparse = None
        if self.training and self.cfg.sparse_training:
            sparse = self._sparse_encode(sae_in)
            feature_acts, hidden_pre = self._sparse_outputs(sparse, sae_in.shape)
            all_levels = self._sparse_decode_levels(sparse, widths, eval_widths, sae_in.shape)
        else:
            feature_acts, hidden_pre = self.encode_with_hidden_pre(sae_in)
            all_levels = self.decode_levels(feature_acts, widths, eval_widths)
        level_outs = all_levels[: len(widths)]
        weights = self._level_weights(len(widths), level_outs)
        mse = level_mse(level_outs, sae_in)
        weighted = weights * mse

        losses: dict[str, torch.Tensor] = {"mse_loss": weighted[-1]}
        if sampled:
            losses["sampled_prefixes_mse_loss"] = weighted[:-1].sum()
        else:
            for width, value in zip(widths[:-1], weighted[:-1], strict=True):
                losses[f"inner_mse_loss_{width}"] = value
        losses.update(self._sparsity_loss(step_input, feature_acts, hidden_pre, widths, weights))
        losses["auxiliary_reconstruction_loss"] = self._aux_loss(
            step_input, hidden_pre, level_outs, widths, sparse
        )
        loss = torch.stack(list(losses.values())).sum()
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                self._non_finite_loss_message(step_input.n_training_steps, losses)
            )

        metrics: dict[str, Any] = {}
        if self.cfg.activation == "batchtopk":
            self._update_threshold(feature_acts if sparse is None else sparse.acts)
            metrics["topk_threshold"] = self.topk_threshold
        if eval_widths is not None:
            eval_mse = level_mse(all_levels[len(widths) :].detach(), sae_in)
            metrics.update(level_metrics(sae_in, eval_mse, eval_widths))
        elif not sampled:
            metrics.update(level_metrics(sae_in, mse.detach(), widths))
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=level_outs[-1],
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    def _sparse_encode(self, x: torch.Tensor) -> _SparseBatch:
        """Encode densely without gradient, select, then re-attach only the active entries."""
        sae_in = self.process_sae_in(x).reshape(-1, self.cfg.d_in)
        norms = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            # one n_tokens x d_sae buffer: the bias and the norms are applied in place
            hidden_pre = torch.addmm(self.b_enc, sae_in, self.W_enc)
            if norms is not None:
                hidden_pre.mul_(norms)
            if self.cfg.activation == "batchtopk":
                select = (
                    distributed.global_batch_topk_indices
                    if self._collective_step
                    else batch_topk_indices
                )
                token, latent = select(hidden_pre, self.cfg.k)  # type: ignore[arg-type]
            else:
                token, latent = topk_indices(hidden_pre, int(self.cfg.k))  # type: ignore[arg-type]
        acts = encoder_values(sae_in, self.W_enc, self.b_enc, norms, hidden_pre, token, latent)
        return _SparseBatch(sae_in, hidden_pre, norms, token, latent, acts)

    def _decode_weights(
        self, batch: _SparseBatch, acts: torch.Tensor, latent: torch.Tensor
    ) -> torch.Tensor:
        """Activations as they multiply decoder rows (divided back by the norms if rescaled)."""
        if batch.norms is None:
            return acts
        return acts * (1 / batch.norms)[latent]

    def _sparse_outputs(
        self, batch: _SparseBatch, shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense activations and pre-activations (no gradient) for SAELens's statistics and hooks.

        The hooks observe them; edits a hook makes do not reach the loss (use
        ``training_path="dense"`` for that).
        """
        out_shape = (*shape[:-1], self.cfg.d_sae)
        hidden_pre = self.hook_sae_acts_pre(batch.hidden_pre.view(out_shape))
        acts = dense_acts(batch.acts, batch.token, batch.latent, batch.hidden_pre.shape)
        return self.hook_sae_acts_post(acts.view(out_shape)), hidden_pre

    def _sparse_decode_levels(
        self,
        batch: _SparseBatch,
        widths: list[int],
        eval_widths: list[int] | None,
        shape: torch.Size,
    ) -> torch.Tensor:
        """:meth:`decode_levels` computed from the active entries only."""
        weights = self._decode_weights(batch, batch.acts, batch.latent)
        n_tokens = batch.sae_in.shape[0]
        args = (batch.token, batch.latent, self.W_dec, self.b_dec)
        levels = decode_levels_sparse(
            weights, *args, widths, n_tokens, self.cfg.detach_between_levels
        )
        if eval_widths is not None:
            with torch.no_grad():
                extra = decode_levels_sparse(weights, *args, eval_widths, n_tokens)
            levels = torch.cat([levels, extra])
        levels = levels.view(levels.shape[0], *shape)
        return self.run_time_activation_norm_fn_out(levels)

    def _sparsity_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        widths: list[int],
        weights: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Nested sparsity penalty: each latent counted once per (weighted) level containing it."""
        if self.cfg.activation not in ("relu", "jumprelu"):
            return {}
        multiplicity = latent_level_weights(widths, weights)
        if self.cfg.activation == "relu":
            # L1 of the activations times the norm of the decoder vector they
            # multiply: 1 when activations are measured in unit-norm units
            magnitude = feature_acts
            if not self.cfg.rescale_acts_by_decoder_norm:
                magnitude = feature_acts * self.W_dec.norm(dim=-1)
            per_token = (magnitude.abs() * multiplicity).sum(dim=-1)
            return {"l1_loss": (step_input.coefficients["l1"] * per_token).mean()}
        fired = StepSTE.apply(
            hidden_pre, self.threshold.to(hidden_pre.dtype), self.cfg.jumprelu_bandwidth
        )
        per_token = (fired * multiplicity).sum(dim=-1)
        return {"l0_loss": (step_input.coefficients["l0"] * per_token).mean()}

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """SAELens's aux-loss hook (fixed widths); ``training_forward_pass`` reuses its decodes."""
        widths = self.matryoshka_widths
        level_outs = (
            self.decode_levels(feature_acts, widths)
            if self.cfg.use_matryoshka_aux_loss
            else sae_out.unsqueeze(0)
        )
        return {
            "auxiliary_reconstruction_loss": self._aux_loss(
                step_input, hidden_pre, level_outs, widths
            )
        }

    def _aux_loss(
        self,
        step_input: TrainStepInput,
        hidden_pre: torch.Tensor,
        level_outs: torch.Tensor,
        widths: list[int],
        sparse: _SparseBatch | None = None,
    ) -> torch.Tensor:
        """Dead-latent auxiliary loss (Gao et al. 2024), whole-SAE or per level.

        The ``d_in // 2`` dead latents with the largest pre-activations are asked
        to reconstruct the residual of the live ones; the loss is scaled down
        when fewer latents are dead than that. With ``use_matryoshka_aux_loss``
        each level's group of dead latents reconstructs its own level's residual.
        """
        dead = step_input.dead_neuron_mask
        zero = level_outs.new_zeros(())
        if dead is None or self.cfg.aux_loss_coefficient == 0 or not bool(dead.any()):
            return zero
        if self.cfg.use_matryoshka_aux_loss:
            starts = [0, *widths[:-1]]
            parts = list(zip(starts, widths, level_outs, strict=True))
        else:
            parts = [(0, self.cfg.d_sae, level_outs[-1])]
        scale = self._decoder_scale() if sparse is None else None
        total = zero
        for start, end, recon in parts:
            residual = (step_input.sae_in - recon).detach()
            if sparse is not None:
                total = total + self._sparse_dead_latent_loss(sparse, residual, dead, start, end)
                continue
            total = total + dead_latent_loss(
                residual=residual,
                hidden_pre=hidden_pre[..., start:end],
                dead=dead[start:end],
                W_dec=self.W_dec[start:end],
                scale=None if scale is None else scale[start:end],
            )
        return self.cfg.aux_loss_coefficient * total

    def _sparse_dead_latent_loss(
        self, batch: _SparseBatch, residual: torch.Tensor, dead: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """:func:`~sae_lens_matryoshka.losses.dead_latent_loss` of latents ``[start, end)``, sparsely."""
        n_dead = int(dead[start:end].sum())
        if n_dead == 0:
            return residual.new_zeros(())
        token, latent = dead_topk_indices(
            batch.hidden_pre[:, start:end], dead[start:end], aux_k(self.cfg.d_in)
        )
        latent = latent + start
        acts = encoder_values(
            batch.sae_in, self.W_enc, self.b_enc, batch.norms, batch.hidden_pre, token, latent
        )
        weights = self._decode_weights(batch, acts, latent)
        recon = bag_sum(self.W_dec, latent, token, weights, batch.sae_in.shape[0])
        return dead_latent_mse(recon.view_as(residual), residual, n_dead)

    @torch.no_grad()
    def _update_threshold(self, feature_acts: torch.Tensor) -> None:
        """Track the smallest kept activation: the JumpReLU threshold for inference."""
        positive = feature_acts[feature_acts > 0]
        with torch.autocast(self.topk_threshold.device.type, enabled=False):
            smallest = (
                positive.min().to(self.topk_threshold.dtype)
                if positive.numel()
                else self.topk_threshold.new_tensor(torch.inf)
            )
            if self._collective_step:
                smallest = distributed.global_min(smallest)
            if torch.isinf(smallest):
                return
            if self.topk_threshold < 0:
                self.topk_threshold.copy_(smallest)
            else:
                lr = self.cfg.topk_threshold_lr
                self.topk_threshold.copy_((1 - lr) * self.topk_threshold + lr * smallest)

    def _non_finite_loss_message(self, step: int, losses: dict[str, torch.Tensor]) -> str:
        """Why the loss is NaN/Inf: poisoned parameters (say which), or which loss terms."""
        parameters = _non_finite_names(dict(self.named_parameters()))
        if parameters:
            cause = (
                f"the parameters {parameters} already hold NaN/Inf, so an earlier update "
                "overflowed (float16 parameters with Adam do this; train in float32 or "
                "bfloat16, or lower the learning rate)"
            )
        else:
            cause = f"the loss terms {_non_finite_names(losses)} are NaN/Inf"
        return (
            f"Training step {step}: the loss is not finite: {cause}. This step updated nothing; "
            "checkpoints already written are intact."
        )

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if not self.cfg.rescale_acts_by_decoder_norm:
            return
        # activations are measured in units of ||W_dec||, which just shrank
        if self.cfg.activation == "batchtopk" and self.topk_threshold >= 0:
            self.topk_threshold /= scaling_factor
        if self.cfg.activation == "jumprelu":
            self.threshold /= scaling_factor

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if self.cfg.rescale_acts_by_decoder_norm:
            super().fold_W_dec_norm()
            return
        if self.cfg.activation in ("batchtopk", "topk"):
            raise NotImplementedError(
                "Folding W_dec norms changes which latents a top-k keeps unless "
                "the SAE was trained with rescale_acts_by_decoder_norm=True."
            )
        threshold = self.threshold.detach().clone() if self.cfg.activation == "jumprelu" else None
        norms = self.fold_and_get_W_dec_norm()
        if threshold is not None:
            self.threshold.data = (threshold * norms).float()

    @override
    @classmethod
    def load_from_disk(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        converter: PretrainedSaeDiskLoader = keep_threshold_precision,
        fold_W_dec_norm: bool = False,
    ) -> MatryoshkaTrainingSAE:
        """SAELens's ``load_from_disk``, keeping the thresholds' saved precision (for resuming)."""
        return super().load_from_disk(path, device, dtype, converter, fold_W_dec_norm)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAELens's loaders cast every tensor to the config dtype; thresholds keep theirs
        super().process_state_dict_for_loading(state_dict)
        check_finite_weights(state_dict)
        if "topk_threshold" in state_dict:
            state_dict["topk_threshold"] = state_dict["topk_threshold"].double()
        if self.cfg.activation == "jumprelu" and "threshold" in state_dict:
            state_dict["threshold"] = state_dict["threshold"].float()

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Turn training weights into the inference ``MatryoshkaSAE``'s.

        Decoder norms are folded into the encoder, so inference needs no
        rescaling (thresholds are in the folded units already), and a batchtopk
        SAE's learned threshold becomes a per-latent JumpReLU threshold.
        """
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop("prefix_rng_state", None)
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.detach().norm(dim=-1)
            state_dict["W_enc"] = state_dict["W_enc"] * norms
            state_dict["b_enc"] = state_dict["b_enc"] * norms
            state_dict["W_dec"] = state_dict["W_dec"] / norms.unsqueeze(1)
        if self.cfg.activation == "batchtopk":
            threshold = state_dict.pop("topk_threshold").clamp(min=0.0)
            state_dict["threshold"] = torch.full_like(state_dict["b_enc"], threshold.item())
        elif self.cfg.activation == "jumprelu":
            state_dict["threshold"] = state_dict["threshold"].to(state_dict["b_enc"].dtype)


def _non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]


def _check_finite(sae_in: torch.Tensor, step: int) -> None:
    """Stop before a NaN/Inf batch reaches the parameters (it would poison them for good)."""
    bad = int((~torch.isfinite(sae_in)).sum())
    if bad:
        raise FloatingPointError(
            f"Training step {step}: the activation batch holds {bad} non-finite values (NaN/Inf) "
            f"out of {sae_in.numel()}. No parameter was updated in this step; checkpoints already "
            "written are intact. Check the model's activations at this hook (e.g. fp16 overflow)."
        )
