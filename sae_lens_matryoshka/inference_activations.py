"""The activations of the inference ``MatryoshkaSAE``: one ``nn.Module`` each, built from its config.

A saved Matryoshka SAE infers with ``"jumprelu"`` (per-latent thresholds:
what batchtopk and jumprelu training save), ``"topk"`` or ``"relu"``
(``MatryoshkaSAEConfig.activation``), exactly as SAELens's flat SAEs of the
same activation compute. The training activations (``activations``) say
which of these their saved SAE uses (``config.TRAINING_ACTIVATIONS``), and
turn their state into its tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from sae_lens.saes.topk_sae import TopK
from sae_lens.util import str_to_dtype
from torch import nn
from typing_extensions import override

from sae_lens_matryoshka.kernels.jumprelu import jumprelu
from sae_lens_matryoshka.kernels.selection import topk

if TYPE_CHECKING:
    from sae_lens_matryoshka.config import MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig


def required_k(cfg: MatryoshkaTrainingSAEConfig | MatryoshkaSAEConfig) -> float:
    """``cfg.k``, which every k-sparse activation's config has (the configs check it)."""
    if cfg.k is None:  # the configs refuse this; here for the type checker
        raise ValueError(f"activation={cfg.activation!r} needs k.")
    return cfg.k


class InferenceActivation(nn.Module):
    """The activation of a ``MatryoshkaSAE``, built from its config: ReLU unless a subclass says otherwise.

    ``forward`` gets the pre-activations of the first ``width`` latents (all
    of them when ``selects_among_all_latents``).
    """

    #: whether every latent's pre-activation is needed to activate any of them
    selects_among_all_latents: ClassVar[bool] = False
    #: the SAELens architecture computing the same activation, whose attributes the SAE has
    #: (what tools that dispatch on SAELens's architectures should treat it as)
    saelens_architecture: ClassVar[str] = "standard"
    #: when a latent fires, for messages
    fires: ClassVar[str] = "when its pre-activation is positive"

    def __init__(self, cfg: MatryoshkaSAEConfig) -> None:
        del cfg  # ReLU has no settings
        super().__init__()

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return hidden_pre.relu()

    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        """Fold decoder norms into the encoder (``fold`` does it and returns the norms)."""
        fold()

    def truncated_config(self, cfg_dict: dict[str, Any], width: int) -> None:
        """Adjust the config of an SAE truncated to its first ``width`` latents."""


class InferenceJumpReLU(InferenceActivation):
    """ReLU that also zeroes every latent at or below its ``threshold`` (in the SAE's dtype).

    The SAE shows ``threshold`` as its own attribute, as SAELens's ``JumpReLUSAE`` does.
    """

    saelens_architecture: ClassVar[str] = "jumprelu"
    fires: ClassVar[str] = "when its pre-activation is above its threshold"
    threshold: nn.Parameter

    def __init__(self, cfg: MatryoshkaSAEConfig) -> None:
        super().__init__(cfg)
        dtype = str_to_dtype(cfg.dtype)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=cfg.device))

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        threshold = self.threshold[: hidden_pre.shape[-1]].to(hidden_pre.dtype)
        return jumprelu(hidden_pre, threshold)

    @override
    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        scale_with_folded_norms(self.threshold, fold)


class InferenceTopK(InferenceActivation, TopK):
    """Each token's ``k`` largest pre-activations over all latents, then ReLU.

    Also a SAELens ``TopK``: tools that recognise a top-k SAE by its activation
    (SAEDashboard encodes such an SAE whole instead of masking latents, which
    would change the selection) treat this one as they treat SAELens's.
    """

    selects_among_all_latents: ClassVar[bool] = True
    saelens_architecture: ClassVar[str] = "topk"
    fires: ClassVar[str] = "when it is among each token's k largest pre-activations"
    k: int

    def __init__(self, cfg: MatryoshkaSAEConfig) -> None:
        # SAELens's TopK initialises the module and holds k (``InferenceActivation``'s takes no k)
        TopK.__init__(self, int(required_k(cfg)))

    @override
    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return topk(hidden_pre, self.k)

    @override
    def fold_decoder_norms(self, fold: Callable[[], torch.Tensor]) -> None:
        raise NotImplementedError(
            "Folding W_dec norms changes which latents top-k keeps; this SAE was "
            "not saved with rescale_acts_by_decoder_norm."
        )

    @override
    def truncated_config(self, cfg_dict: dict[str, Any], width: int) -> None:
        warnings.warn(
            "truncating a topk SAE: the truncated SAE selects its k latents among the "
            f"first {width} only, so a token can use latents the full SAE left inactive.",
            stacklevel=3,
        )
        cfg_dict["k"] = min(self.k, width)


#: ``MatryoshkaSAEConfig.activation`` (``config.INFERENCE_ACTIVATIONS``) -> its class
INFERENCE_ACTIVATION_CLASSES: dict[str, type[InferenceActivation]] = {
    "jumprelu": InferenceJumpReLU,
    "topk": InferenceTopK,
    "relu": InferenceActivation,
}


def inference_activation(cfg: MatryoshkaSAEConfig) -> InferenceActivation:
    """The activation ``cfg`` names."""
    return INFERENCE_ACTIVATION_CLASSES[cfg.activation](cfg)


@torch.no_grad()
def scale_with_folded_norms(threshold: nn.Parameter, fold: Callable[[], torch.Tensor]) -> None:
    """Fold decoder norms (``fold`` does it and returns them) and scale ``threshold`` with them.

    Thresholds are in the units of the pre-activation, which scales with the norm.
    """
    threshold.data = threshold.data * fold().to(threshold.dtype)
