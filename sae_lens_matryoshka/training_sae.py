"""The training class of the ``"matryoshka"`` architecture.

``MatryoshkaTrainingSAE`` plugs into SAELens's ``SAETrainer`` and
``LanguageModelSAETrainingRunner`` like any built-in architecture: the runner
builds it from a ``MatryoshkaTrainingSAEConfig``, calls
``training_forward_pass`` every step, checkpoints it with ``save_model`` and
saves the final dictionary with ``save_inference_model`` as a ``MatryoshkaSAE``.

What varies is held by objects chosen once, when the SAE is built: the
activation (``activation_fn``, see ``activations``), the levels each step
trains (``levels``: fixed widths or sampled prefixes), the encoding a step
works from (dense or sparse, see ``encodings``), the batch-global operations
(``collectives``: one process, or a mesh of ranks), the part of the dictionary
it holds (``latent_part``: all of it, or one shard), the dead-latent loss
(``aux_loss``, see ``losses``), how ``b_dec`` starts (``b_dec_init``, see
``parametrization``), and the decoder: how its rows are held and in what units
activations multiply them (``decoder``, see ``decoder``). This class only
composes them.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_lens_matryoshka.activations import TrainingActivation, training_activation
from sae_lens_matryoshka.collectives import SINGLE_PROCESS, Collectives
from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.decoder import training_decoder
from sae_lens_matryoshka.encodings import DenseEncoding, Encoding, PreActivations, SparseEncoding
from sae_lens_matryoshka.io import checkpoints
from sae_lens_matryoshka.io.safe_loading import check_finite_weights
from sae_lens_matryoshka.kernels.level_decode import decode_levels
from sae_lens_matryoshka.latent_part import LatentPart
from sae_lens_matryoshka.levels import LevelPlan, training_levels
from sae_lens_matryoshka.losses import AUX_LOSSES, aux_k, level_metrics, level_mse
from sae_lens_matryoshka.parametrization import B_DEC_INITS
from sae_lens_matryoshka.sae_base import MatryoshkaSAEParts, check_activations


class MatryoshkaTrainingSAE(MatryoshkaSAEParts, TrainingSAE[MatryoshkaTrainingSAEConfig]):
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
    activation_fn: TrainingActivation

    def __init__(self, cfg: MatryoshkaTrainingSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        self.levels = training_levels(cfg)
        #: the batch-global operations of a training step (a distributed run replaces them)
        self.collectives: Collectives = SINGLE_PROCESS
        #: the latents this SAE holds: the whole dictionary, unless built by :meth:`build_shard`
        self.latent_part = LatentPart.whole(cfg.d_sae)
        self.aux_loss = AUX_LOSSES[cfg.aux_loss_form]
        self.b_dec_init = B_DEC_INITS[cfg.b_dec_init]()
        self.decoder = training_decoder(cfg)
        self.decoder.initialize(self.W_dec, self.W_enc)
        self.save_children_flat(["activation_fn", "levels"])

    @classmethod
    def build_shard(
        cls, cfg: MatryoshkaTrainingSAEConfig, part: LatentPart, collectives: Collectives
    ) -> MatryoshkaTrainingSAE:
        """A new SAE holding only ``part`` of ``cfg``'s dictionary, its steps using ``collectives``.

        How a latent-sharded run builds each rank's SAE (``sharding.sharded_training_sae``
        gives a mesh's part and collectives). The whole dictionary is never
        allocated: the SAE is built on the meta device, then its part's
        parameters are made on ``cfg.device`` and initialised as SAELens's
        ``initialize_weights`` initialises the whole (Kaiming-uniform decoder
        rows, rows scaled to ``decoder_init_norm``, ``W_enc = W_dec.T``, zero
        biases). The rows come from the global random stream one shard's block
        at a time, so every shard draws the same sequence and keeps its own
        block, and no two shards start alike.
        """
        on_meta = copy.copy(cfg)
        on_meta.device = "meta"
        sae = cls(on_meta)
        device, dtype = torch.device(cfg.device), sae.dtype
        rows = part.stop - part.start
        for shard in range(part.n_shards):
            empty = torch.empty(rows, cfg.d_in, device=device, dtype=dtype)
            block = nn.init.kaiming_uniform_(empty)
            if shard == part.shard:
                W_dec = block
        if cfg.decoder_init_norm is not None:
            W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * cfg.decoder_init_norm
        sae.W_dec = nn.Parameter(W_dec)
        sae.W_enc = nn.Parameter(W_dec.T.clone().contiguous())
        sae.b_enc = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype))
        sae.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        sae.cfg, sae.device = cfg, device
        # rebuilt on the real device: the activation's and the levels' state
        sae.activation_fn = sae.get_activation_fn()
        sae.levels = training_levels(cfg)
        sae.decoder.initialize(sae.W_dec, sae.W_enc)
        sae.collectives, sae.latent_part = collectives, part
        left_on_meta = [name for name, tensor in sae.state_dict().items() if tensor.is_meta]
        if left_on_meta:  # a tensor this method does not know how to make
            raise RuntimeError(f"the shard's {left_on_meta} were never materialised.")
        return sae

    @override
    def get_activation_fn(self) -> TrainingActivation:
        return training_activation(self.cfg)

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return self.activation_fn.coefficients()

    # ------------------------------------------------------------------ encode, decode

    def _encode_dense(self, x: torch.Tensor, collectives: Collectives) -> DenseEncoding:
        sae_in = self.process_sae_in(x)
        norms = self.W_dec.norm(dim=-1)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        hidden_pre = self.decoder.scale_pre_activations(hidden_pre, lambda: norms)
        acts = self.hook_sae_acts_post(self.activation_fn.step_forward(hidden_pre, collectives))
        return DenseEncoding(hidden_pre, acts, norms, self.decoder)

    def _encode_sparse(self, x: torch.Tensor, collectives: Collectives) -> SparseEncoding:
        """Encode densely without a graph, select, then re-attach only the active entries.

        Hooks on ``hook_sae_acts_pre`` and ``hook_sae_acts_post`` observe the
        pre-activations and the (sparse COO) activations; what they return is
        not used (``training_path="dense"`` lets hooks edit activations).
        """
        if x.requires_grad:
            raise ValueError(
                "The sparse training path does not backpropagate into the input activations; "
                "detach them, or use training_path='dense'."
            )
        with torch.no_grad():
            # b_dec's gradient through the input comes from the encoder's sparse backward
            sae_in = self.process_sae_in(x)
            batch_shape = sae_in.shape[:-1]
            sae_in = sae_in.reshape(-1, self.cfg.d_in)
            # one n_tokens x d_sae buffer: the bias and the norms are applied in place
            hidden_pre = torch.addmm(self.b_enc, sae_in, self.W_enc)
            raw_values = self.decoder.scale_pre_activations_(hidden_pre, self.W_dec)
        self.hook_sae_acts_pre(hidden_pre.view(*batch_shape, -1))
        shift = self.b_dec if self.cfg.apply_b_dec_to_input else None
        pre = PreActivations(
            hidden_pre, sae_in, shift, self.W_enc, self.b_enc, raw_values, batch_shape
        )
        token, latent = self.activation_fn.select(hidden_pre, collectives)
        encoding = SparseEncoding.select(pre, token, latent)
        self.hook_sae_acts_post(encoding.feature_acts)
        return encoding

    def _encode_step(self, x: torch.Tensor, collectives: Collectives) -> Encoding:
        if self.training and self.cfg.sparse_training:
            return self._encode_sparse(x, collectives)
        return self._encode_dense(x, collectives)

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = self._encode_dense(x, SINGLE_PROCESS)
        return encoding.acts, encoding.hidden_pre

    def _decoding_acts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Activations as they multiply decoder rows (see ``decoder``)."""
        self.check_latents(feature_acts)
        if feature_acts.is_sparse:
            feature_acts = feature_acts.to_dense()
        return self.decoder.decoding_acts(feature_acts, lambda: self.W_dec.norm(dim=-1))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out_pre = self.hook_sae_recons(
            self._decoding_acts(feature_acts) @ self.W_dec + self.b_dec
        )
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    def decode_levels(
        self, feature_acts: torch.Tensor, widths: list[int] | None = None
    ) -> torch.Tensor:
        """Reconstructions of every level, shape ``[n_levels, *batch, d_in]``.

        Level ``l`` decodes only latents ``< widths[l]`` (default
        ``matryoshka_widths``); the last level equals ``decode(feature_acts)``.
        One cumulative decode, with ``detach_between_levels`` applied.
        """
        levels = decode_levels(
            self._decoding_acts(feature_acts),
            self.W_dec,
            self.b_dec,
            self.matryoshka_widths if widths is None else widths,
            self.cfg.detach_between_levels,
        )
        return self.run_time_activation_norm_fn_out(levels)

    def _decode_step_levels(
        self,
        encoding: Encoding,
        plan: LevelPlan,
        logged: LevelPlan | None,
        collectives: Collectives,
    ) -> torch.Tensor:
        """The trained levels, then (without a graph) the ``logged`` ones, output-normalised once.

        With the latents sharded, this process decodes its latents' part of
        each level and ``collectives`` sums the parts.
        """
        b_dec = collectives.decoder_bias(self.b_dec)
        detach = self.cfg.detach_between_levels
        local = self.latent_part.local_plan  # bounds in this SAE's own latent numbering
        levels = encoding.decode_levels(self.W_dec, b_dec, local(plan), detach)
        if logged is not None:
            with torch.no_grad():
                extra = encoding.decode_levels(self.W_dec, b_dec, local(logged), False)
            levels = torch.cat([levels, extra])
        levels = collectives.whole_reconstruction(levels)
        # the activation normalisation's inverse can run only once per input
        return self.run_time_activation_norm_fn_out(levels)

    # -------------------------------------------------------------------- the step

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # collectives only inside a training step, where every replica runs the same
        # ones: an eval-mode pass may run on one rank alone
        collectives = self.collectives if self.training else SINGLE_PROCESS
        x = step_input.sae_in
        check_activations(x, self.cfg.d_in, heads_flattened=self.hook_z_reshaping_mode)
        if self.training:
            self.decoder.before_step(self.W_dec)
            if step_input.n_training_steps == 0:
                self.b_dec_init.first_step(self.b_dec, x, collectives)
        self.activation_fn.prepare_step()
        plan = self.levels.step_plan(self.W_dec.device)
        evaluated = self.levels.evaluated(self.W_dec.device)
        logs_other_levels = plan.widths != evaluated.widths and step_input.is_logging_step
        encoding = self._encode_step(x, collectives)
        all_levels = self._decode_step_levels(
            encoding, plan, evaluated if logs_other_levels else None, collectives
        )
        # a slice, even of everything, would give backward a zero-filled copy of the gradient
        levels = all_levels[: len(plan.widths)] if logs_other_levels else all_levels
        mse = level_mse(levels, x)
        weighted = plan.weights * mse
        penalties = self.activation_fn.sparsity_loss(encoding, plan, step_input.coefficients)
        penalties["auxiliary_reconstruction_loss"] = self._aux_loss(
            step_input, encoding, levels, plan, collectives
        )
        # summed from the whole vector: the loss terms shown below are views of it,
        # which backward then never has to take apart
        loss = sum(penalties.values(), weighted.sum())
        losses = {**self.levels.loss_terms(weighted), **penalties}
        self._stop_if_not_finite(loss, losses, step_input)

        metrics: dict[str, Any] = {}
        if self.training:
            metrics.update(
                self.activation_fn.update_from_step(
                    encoding, collectives, step_input.n_training_steps
                )
            )
        if logs_other_levels:
            logged_mse = level_mse(all_levels[len(plan.widths) :].detach(), x)
            metrics.update(level_metrics(x, logged_mse, evaluated.widths))
        elif step_input.is_logging_step and plan.widths == evaluated.widths:
            metrics.update(level_metrics(x, mse.detach(), plan.widths))
        return TrainStepOutput(
            sae_in=x,
            sae_out=levels[-1],
            # SAELens's trainer counts firing and dead latents over the whole dictionary
            feature_acts=collectives.whole_feature_acts(encoding.feature_acts),
            hidden_pre=encoding.hidden_pre,
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    def _aux_loss(
        self,
        step_input: TrainStepInput,
        encoding: Encoding,
        levels: torch.Tensor,
        plan: LevelPlan,
        collectives: Collectives,
    ) -> torch.Tensor:
        """Dead-latent auxiliary loss (Gao et al. 2024), whole-SAE or per level.

        The ``d_in // 2`` dead latents with the largest pre-activations are asked
        to reconstruct the residual of the live ones, in ``aux_loss``'s form
        (SAELens's or dictionary_learning's). With ``use_matryoshka_aux_loss``
        each level's group of dead latents reconstructs its own level's residual.
        """
        dead = step_input.dead_neuron_mask
        zero = levels.new_zeros(())
        if dead is None or self.cfg.aux_loss_coefficient == 0:
            return zero
        if tuple(dead.shape) != (self.cfg.d_sae,):
            raise ValueError(
                f"the dead-latent mask must have shape ({self.cfg.d_sae},) (one flag per "
                f"latent), got {tuple(dead.shape)}."
            )
        # A host synchronisation the aux loss needs: how many latents are dead
        # decides its shapes, and whether it runs at all.
        dead_latents = collectives.dead_everywhere(dead).nonzero().squeeze(1)
        if dead_latents.numel() == 0:
            return zero
        if self.cfg.use_matryoshka_aux_loss:
            # a host read too (where each level's group of dead latents ends), right
            # after the one above, so the device has only a searchsorted to finish first
            cuts = torch.searchsorted(dead_latents, plan.bounds).tolist()
            groups = dead_latents.tensor_split(cuts)
            parts = list(zip(groups, levels, strict=True))
        else:
            parts = [(dead_latents, levels[-1])]
        total = zero
        for latents, level in parts:
            if latents.numel() == 0:  # of the whole dictionary: the same on every shard
                continue
            # this SAE's own (all of them in one process; a shard's by a mask: a host read)
            held = self.latent_part.held_latents(latents)
            residual = (step_input.sae_in - level).detach()
            n_pick = min(aux_k(self.cfg.d_in), latents.numel())
            part = encoding.dead_latent_reconstruction(
                held, n_pick, self.W_dec, self.aux_loss.rectified, collectives
            )
            recon = collectives.whole_reconstruction(part)
            total = total + self.aux_loss(recon, residual, latents.numel(), collectives)
        return self.cfg.aux_loss_coefficient * total

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """SAELens's aux-loss hook (fixed widths); ``training_forward_pass`` computes the same."""
        acts = feature_acts.to_dense() if feature_acts.is_sparse else feature_acts
        norms = self.W_dec.norm(dim=-1)
        encoding = DenseEncoding(hidden_pre, acts, norms, self.decoder)
        levels = self.decode_levels(acts) if self.cfg.use_matryoshka_aux_loss else sae_out[None]
        plan = self.levels.evaluated(self.W_dec.device)
        aux = self._aux_loss(step_input, encoding, levels, plan, SINGLE_PROCESS)
        return {"auxiliary_reconstruction_loss": aux}

    def _stop_if_not_finite(
        self, loss: torch.Tensor, losses: dict[str, torch.Tensor], step_input: TrainStepInput
    ) -> None:
        """Raise before any update when the loss is NaN/Inf, saying why.

        The one host synchronisation every step needs: SAELens's trainer steps
        the optimizer right after ``backward``, so this is the last moment a
        NaN/Inf batch (which always makes the loss NaN/Inf) can be kept from
        the parameters, where it would stay for good.
        """
        if math.isfinite(float(loss.detach())):
            return
        step = step_input.n_training_steps
        bad = int((~torch.isfinite(step_input.sae_in)).sum())
        if bad:
            raise FloatingPointError(
                f"Training step {step}: the activation batch holds {bad} non-finite values "
                f"(NaN/Inf) out of {step_input.sae_in.numel()}. No parameter was updated in this "
                "step; checkpoints already written are intact. Check the model's activations at "
                "this hook (e.g. fp16 overflow)."
            )
        parameters = _non_finite_names(self.state_dict(keep_vars=True))
        if parameters:
            cause = (
                f"the parameters {parameters} already hold NaN/Inf, so an earlier update "
                "overflowed (float16 parameters with Adam do this; train in float32 or "
                "bfloat16, or lower the learning rate)"
            )
        else:
            cause = f"the loss terms {_non_finite_names(losses)} are NaN/Inf"
        raise FloatingPointError(
            f"Training step {step}: the loss is not finite: {cause}. This step updated nothing; "
            "checkpoints already written are intact."
        )

    # ------------------------------------------------------------- folding and saving

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.decoder.fold_scaling_factor(self.activation_fn, scaling_factor)

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        self.decoder.fold_W_dec_norm(self.fold_and_get_W_dec_norm, self.activation_fn)

    @override
    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        """What resuming loads: refused if the checkpoint is incomplete, trained another SAE,
        or holds another part of a latent-sharded dictionary."""
        checkpoints.check_complete(checkpoint_path)
        checkpoints.check_part(checkpoint_path, self.latent_part.checkpoint_record())
        saved = json.loads((Path(checkpoint_path) / SAE_CFG_FILENAME).read_text())
        differences = [
            f"{name}: checkpoint {saved.get(name)!r}, this run {getattr(self.cfg, name)!r}"
            for name in _MUST_MATCH_ON_RESUME
            if saved.get(name) != getattr(self.cfg, name)
        ]
        if differences:
            raise ValueError(
                f"cannot resume from {checkpoint_path}: it trained another SAE "
                f"({'; '.join(differences)}). Resume with the checkpoint's settings."
            )
        super().load_weights_from_checkpoint(checkpoint_path)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # SAELens's loaders cast every tensor to the config dtype; thresholds keep theirs
        super().process_state_dict_for_loading(state_dict)
        check_finite_weights(state_dict)
        self.activation_fn.prepare_loaded(state_dict)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Turn training weights into the inference ``MatryoshkaSAE``'s.

        The decoder gives its rows their saved form: unit-norm rows get their
        last renormalisation, and activations measured in unit-norm decoder
        units have the norms folded into the encoder, so inference needs no
        rescaling (thresholds are in the folded units already). Then the
        activation converts its state (a batchtopk SAE's learned threshold
        becomes a per-latent JumpReLU threshold).
        """
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict.pop("prefix_rng_state", None)
        self.decoder.for_inference(state_dict)
        self.activation_fn.to_inference(state_dict)


#: what a resumed run must share with its checkpoint (d_in and d_sae are checked by shape)
_MUST_MATCH_ON_RESUME = ("matryoshka_widths", "activation", "k", "prefix_sampling")


def _non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
