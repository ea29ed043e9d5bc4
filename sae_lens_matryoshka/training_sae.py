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
composes them; the step they make up is ``step.training_step``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import nn
from typing_extensions import override

from sae_lens_matryoshka import step
from sae_lens_matryoshka.activations import TrainingActivation, training_activation
from sae_lens_matryoshka.collectives import SINGLE_PROCESS, Collectives
from sae_lens_matryoshka.config import MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.decoder import training_decoder
from sae_lens_matryoshka.divergence import DivergenceWatch
from sae_lens_matryoshka.encodings import DenseEncoding
from sae_lens_matryoshka.io import checkpoints
from sae_lens_matryoshka.io.safe_loading import check_finite_weights
from sae_lens_matryoshka.kernels.level_decode import decode_levels
from sae_lens_matryoshka.latent_part import LatentPart
from sae_lens_matryoshka.levels import training_levels
from sae_lens_matryoshka.losses import AUX_LOSSES
from sae_lens_matryoshka.parametrization import B_DEC_INITS
from sae_lens_matryoshka.sae_base import MatryoshkaSAEParts


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
        #: stops a run whose reconstruction stays far worse than the mean's (see ``divergence``)
        self.divergence = DivergenceWatch.from_config(cfg)
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

        Latent ordering (``order_latents_every``) is refused: ordering moves
        latents, their optimizer state and the trainer's statistics across the
        whole dictionary, which a shard does not hold (see ``latent_order``).
        """
        if cfg.order_latents_every:
            raise ValueError(
                f"{type(cfg).__name__}.order_latents_every={cfg.order_latents_every} cannot "
                "be used with latent sharding: ordering would move latents (with their "
                "optimizer state) between the ranks that hold them. Train with "
                "order_latents_every=0 and order the saved SAE with "
                "latent_order.order_latents, or train without latent sharding."
            )
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

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step: see ``step.training_step``."""
        return step.training_step(self, step_input)

    # ------------------------------------------------------------------ encode, decode

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoding = step.encode_dense(self, x, SINGLE_PROCESS)
        return encoding.acts, encoding.hidden_pre

    def _decoding_acts(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Activations as they multiply decoder rows (see ``decoder``)."""
        feature_acts = self.decodable(feature_acts)
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
        reconstructions = decode_levels(
            self._decoding_acts(feature_acts),
            self.W_dec,
            self.b_dec,
            self.matryoshka_widths if widths is None else widths,
            self.cfg.detach_between_levels,
        )
        return self.run_time_activation_norm_fn_out(reconstructions)

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
        if self.cfg.use_matryoshka_aux_loss:
            reconstructions = self.decode_levels(acts)
        else:
            reconstructions = sae_out[None]
        plan = self.levels.evaluated(self.W_dec.device)
        groups = step.dead_latent_groups(self, step_input, plan, SINGLE_PROCESS)
        counts = [int(group.sum()) for group in groups]
        aux = step.dead_latent_loss(
            self, step_input.sae_in, encoding, reconstructions, plan, groups, counts, SINGLE_PROCESS
        )
        return {"auxiliary_reconstruction_loss": aux}

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
        """What resuming loads, once ``checkpoints.check_resumable`` accepts the checkpoint."""
        checkpoints.check_resumable(checkpoint_path, self.cfg, self.latent_part)
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
