"""The inference class of the ``"matryoshka"`` architecture.

``MatryoshkaSAE`` is what ``SAE.load_from_disk`` and ``SAE.from_pretrained``
return for a folder whose ``cfg.json`` says ``"architecture": "matryoshka"``.
It computes exactly what a flat SAELens SAE of the same activation would, and
keeps the prefix widths it was trained with.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from torch import nn
from typing_extensions import override

from sae_lens_matryoshka.config import MatryoshkaSAEConfig
from sae_lens_matryoshka.decoder import folded_decoder, inference_decoder
from sae_lens_matryoshka.inference_activations import (
    InferenceActivation,
    InferenceJumpReLU,
    inference_activation,
)
from sae_lens_matryoshka.io.safe_loading import check_finite_weights
from sae_lens_matryoshka.kernels.level_decode import decode_levels
from sae_lens_matryoshka.sae_base import MatryoshkaSAEParts, warn_non_finite


class MatryoshkaSAE(MatryoshkaSAEParts, SAE[MatryoshkaSAEConfig]):
    """A trained Matryoshka SAE, level-aware.

    Parameters follow SAELens: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for the JumpReLU
    activation, ``threshold [d_sae]``. Every prefix is usable on its own:
    ``encode(x, width)`` / ``decode(acts, width)`` work on the first ``width``
    latents, ``truncate(width)`` makes a standalone SAE of them, and
    ``decode_levels`` returns every level's reconstruction in one decode.
    """

    b_enc: nn.Parameter
    activation_fn: InferenceActivation
    #: JumpReLU-inferring SAEs only: the per-latent thresholds, as ``JumpReLUSAE.threshold``
    #: (held by the activation, shown here by ``__getattr__``; saved as ``threshold``)
    threshold: nn.Parameter

    def __init__(self, cfg: MatryoshkaSAEConfig, use_error_term: bool = False) -> None:
        super().__init__(cfg, use_error_term)
        #: in what units activations multiply decoder rows (see ``decoder``)
        self.decoder = inference_decoder(cfg)
        self.save_children_flat(["activation_fn"])

    @override
    def get_activation_fn(self) -> InferenceActivation:
        return inference_activation(self.cfg)

    @property
    def saelens_architecture(self) -> str:
        """The SAELens architecture computing what this SAE computes: jumprelu, topk or standard.

        The SAE has that class's attributes (``threshold`` for jumprelu), so
        tools that dispatch on SAELens's architecture names can treat it as one
        (see ``dashboard``); ``to_portable`` converts it into one.
        """
        return self.activation_fn.saelens_architecture

    def _jumprelu(self) -> InferenceJumpReLU:
        """The activation holding ``threshold``; ``AttributeError`` (so ``hasattr`` is False) if none does."""
        activation = self.activation_fn
        if not isinstance(activation, InferenceJumpReLU):
            raise AttributeError(
                f"'threshold': this MatryoshkaSAE infers with activation={self.cfg.activation!r}, "
                f"where a latent fires {activation.fires}, so it has no per-latent threshold. "
                "Only SAEs inferring with 'jumprelu' (trained with activation='batchtopk' or "
                "'jumprelu') have sae.threshold, as SAELens's JumpReLUSAE does."
            )
        return activation

    @override
    def __getattr__(self, name: str) -> Any:
        # Only names absent from the instance get here (nn.Module keeps parameters
        # and submodules outside __dict__), so this costs normal lookups nothing.
        if name == "threshold":
            return self._jumprelu().threshold
        return super().__getattr__(name)

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        # ``sae.threshold = nn.Parameter(...)`` (what tools written for JumpReLUSAE
        # do) replaces the activation's tensor; nn.Module would otherwise register
        # a second, unused parameter that shadows nothing and is saved twice.
        if name == "threshold":
            self._jumprelu().threshold = value
        else:
            super().__setattr__(name, value)

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """Check the weights against the config.

        Training checkpoints never reach this: every loader turns them into
        the inference form first (see ``loaders``).
        """
        super().process_state_dict_for_loading(state_dict)
        check_finite_weights(state_dict)
        if "threshold" in state_dict and bool((state_dict["threshold"] < 0).any()):
            raise ValueError(
                f"{SAE_WEIGHTS_FILENAME}: {int((state_dict['threshold'] < 0).sum())} JumpReLU "
                "thresholds are negative; a trained threshold is never below 0 (the file is "
                "damaged or was not written by a JumpReLU SAE)."
            )
        expected = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            raise ValueError(
                f"{SAE_WEIGHTS_FILENAME} lacks {missing}, which {SAE_CFG_FILENAME} requires "
                f"(activation={self.cfg.activation!r}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae})."
            )
        unexpected = sorted(set(state_dict) - set(expected))
        if unexpected:
            raise ValueError(
                f"{SAE_WEIGHTS_FILENAME} has tensors {unexpected} that a Matryoshka SAE with "
                f"activation={self.cfg.activation!r} does not use; is {SAE_CFG_FILENAME} the one "
                "saved with these weights?"
            )
        for name, shape in expected.items():
            found = tuple(state_dict[name].shape)
            if found != shape:
                raise ValueError(
                    f"{SAE_WEIGHTS_FILENAME} does not match {SAE_CFG_FILENAME}: {name} has shape "
                    f"{list(found)}, but d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae} need {list(shape)}."
                )

    def _check_width(self, width: int | None) -> int:
        """``width`` as a prefix size, warning when it was not trained as a level."""
        if width is None:
            return self.cfg.d_sae
        if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= self.cfg.d_sae:
            raise ValueError(
                f"width must be an integer in [1, d_sae={self.cfg.d_sae}], got {width!r}; "
                f"the trained levels are {self.matryoshka_widths}."
            )
        if width not in self.matryoshka_widths:
            warnings.warn(
                f"width {width} was not trained as a level (levels: {self.matryoshka_widths}); "
                "its latents are used as they are.",
                stacklevel=3,
            )
        return width

    @override
    def encode(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Latent activations; with ``width``, only the first ``width`` latents.

        The result equals the full encoding restricted to those latents (for
        topk the selection is made over all latents, as in training).
        """
        width = self._check_width(width)
        # topk selects among all latents, so it needs all pre-activations
        columns = self.cfg.d_sae if self.activation_fn.selects_among_all_latents else width
        sae_in = self.process_sae_in(x)
        warn_non_finite(x, "the activations to encode")
        hidden_pre = sae_in @ self.W_enc[:, :columns] + self.b_enc[:columns]
        hidden_pre = self.hook_sae_acts_pre(hidden_pre)
        hidden_pre = self.decoder.scale_pre_activations(
            hidden_pre, lambda: self.W_dec[:columns].norm(dim=-1)
        )
        acts = self.activation_fn(hidden_pre)[..., :width]
        return self.hook_sae_acts_post(acts)

    def _unit_acts(self, feature_acts: torch.Tensor, width: int) -> torch.Tensor:
        feature_acts = self.decodable(feature_acts, self.cfg.d_sae, width)[..., :width]
        return self.decoder.decoding_acts(feature_acts, lambda: self.W_dec[:width].norm(dim=-1))

    @override
    def decode(self, feature_acts: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Reconstruction from latent activations; with ``width``, from the first ``width`` only.

        ``feature_acts`` may hold all ``d_sae`` latents or just the first ``width``.
        """
        width = self._check_width(width)
        unit_acts = self._unit_acts(feature_acts, width)
        sae_out_pre = self.hook_sae_recons(unit_acts @ self.W_dec[:width] + self.b_dec)
        sae_out_pre = self.run_time_activation_norm_fn_out(sae_out_pre)
        return self.reshape_fn_out(sae_out_pre, self.d_head)

    def decode_levels(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstructions of every level, shape ``[n_levels, *batch, d_in]``.

        Level ``l`` decodes only latents ``< matryoshka_widths[l]``; the last
        level equals ``decode(feature_acts)``. One cumulative decode.
        """
        unit_acts = self._unit_acts(feature_acts, self.cfg.d_sae)
        levels = decode_levels(unit_acts, self.W_dec, self.b_dec, self.matryoshka_widths)
        return self.run_time_activation_norm_fn_out(levels)

    def truncate(self, width: int) -> MatryoshkaSAE:
        """A standalone ``MatryoshkaSAE`` of the first ``width`` latents.

        Its encode/decode equal this SAE's restricted to those latents (a
        topk SAE's selection is then made among the kept latents only, which
        is what a topk SAE of that size would do). Levels below ``width`` are
        kept; ``width`` becomes the last level.
        """
        width = self._check_width(width)
        cfg_dict = self.cfg.to_dict()
        cfg_dict["d_sae"] = width
        cfg_dict["matryoshka_widths"] = [w for w in self.matryoshka_widths if w < width] + [width]
        if width < self.cfg.d_sae:
            self.activation_fn.truncated_config(cfg_dict, width)
        cfg_dict["metadata"] = {**cfg_dict["metadata"], "truncated_from_d_sae": self.cfg.d_sae}
        truncated = derived_sae(MatryoshkaSAEConfig.from_dict(cfg_dict))
        kept = {
            name: (
                tensor[:, :width]
                if name == "W_enc"
                else tensor[:width]
                if name != "b_dec"
                else tensor
            )
            for name, tensor in self.state_dict().items()
        }
        truncated.load_state_dict({name: tensor.clone() for name, tensor in kept.items()})
        return truncated

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold the decoder norms into the encoder, keeping outputs; rows end at unit norm.

        The config then leaves ``rescale_acts_by_decoder_norm`` off, as saved
        SAEs do, and the decoder is chosen again from it.
        """
        self.decoder.fold_W_dec_norm(self.fold_and_get_W_dec_norm, self.activation_fn)
        self.decoder = folded_decoder(self.cfg)


def derived_sae(cfg: MatryoshkaSAEConfig) -> MatryoshkaSAE:
    """A ``MatryoshkaSAE`` made in memory from another (one of its levels, its saved form).

    Without the warning SAELens gives every SAE whose metadata holds
    ``model_from_pretrained_kwargs`` (how to load the model for it): that
    advice is for SAEs a user loads, and runner-trained SAEs always hold them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs"
        )
        return MatryoshkaSAE(cfg)
