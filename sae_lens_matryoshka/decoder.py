"""The decoder: how its rows are held, and in what units activations multiply them. Chosen once.

SAELens's decoder lets rows take any norm, and activations multiply them as
they are (:class:`FreeDecoder`). Two options change that; the SAEs, their
encodings and their activations ask the decoder object they were given,
never the options:

- ``rescale_acts_by_decoder_norm=True`` (:class:`RescaledDecoder`, SAELens's
  option of the same name): rows of any norm, with activations measured as if
  every row had unit norm. The encoder's pre-activations are multiplied by the
  rows' norms, so the activation selects and thresholds on a scale no row's
  drifting norm distorts; decoding divides by the norms again, and ReLU's L1
  penalty needs no norm factor. The saved inference SAE has the norms folded
  into the encoder (``W_enc * norms``, ``b_enc * norms``, ``W_dec / norms``),
  so it computes the same with plain unit-norm rows;
- ``normalize_decoder=True`` (:class:`UnitNormDecoder`, the paper's code and
  sparsify): rows start at unit norm and stay there. The gradient's component
  along each row is removed before the optimizer sees it, and the rows are
  rescaled to unit norm before every step and when saved.

Both together (:class:`RescaledUnitNormDecoder`) hold the rows at unit norm
*and* still measure activations in units of the rows' actual norms. Those are
1 up to rounding right after a renormalisation, but not after an optimizer
step (which moves rows off the unit sphere, to second order, until the next
step renormalises them) nor after ``fold_activation_norm_scaling_factor``
(which divides the rows by the scaling factor), so the rescale is kept, not
dropped: such an SAE computes exactly what a rescaled SAE with these rows
computes, as it always has.

The inference ``MatryoshkaSAE`` has no ``normalize_decoder``: its decoder is
a :class:`FreeDecoder` (saved SAEs have their norms folded in) or, when its
config keeps the rescale, a :class:`RescaledDecoder`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from sae_lens import SAEConfig

    from sae_lens_matryoshka.activations import TrainingActivation
    from sae_lens_matryoshka.config import MatryoshkaSAEConfig, MatryoshkaTrainingSAEConfig
    from sae_lens_matryoshka.inference_activations import InferenceActivation
    from sae_lens_matryoshka.inference_sae import MatryoshkaSAE

#: the decoder rows' norms ``||W_dec_j||``, computed only by a decoder that uses them
Norms = Callable[[], torch.Tensor]
#: the sparse path's entries ``(values, latents)`` of the pre-activations -> their raw
#: pre-activations ``h``, which the sparse path decodes with (see ``encodings.PreActivations``)
RawValues = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: the option's name in SAELens's configs (its TopK SAE's), as in ours
_SAELENS_OPTION = "rescale_acts_by_decoder_norm"


class FreeDecoder:
    """SAELens's plain decoder: rows of any norm, which activations multiply as they are."""

    def initialize(self, W_dec: nn.Parameter, W_enc: nn.Parameter) -> None:
        """Called once the weights are initialised."""

    def before_step(self, W_dec: nn.Parameter) -> None:
        """Called at the start of every training step, before the encoder runs."""

    def scale_pre_activations(self, hidden_pre: torch.Tensor, norms: Norms) -> torch.Tensor:
        """The encoder's pre-activations in the units the activation selects in (with a graph)."""
        del norms  # activations are in the rows' own units
        return hidden_pre

    def scale_pre_activations_(self, hidden_pre: torch.Tensor, W_dec: torch.Tensor) -> RawValues:
        """The sparse path's: ``hidden_pre [n_tokens, d_sae]`` scaled in place, without a graph.

        Returns what turns entries of the scaled pre-activations back into
        raw ones. In place and from one no-graph norm per latent (if any):
        the sparse path allocates no second ``n_tokens x d_sae`` tensor for it,
        and nothing here waits for the device.
        """
        del hidden_pre, W_dec  # activations are in the rows' own units
        return _as_they_are

    def decoding_acts(self, acts: torch.Tensor, norms: Norms) -> torch.Tensor:
        """Activations ``[..., n]`` as they multiply their ``n`` decoder rows (norms ``norms``)."""
        del norms  # activations are in the rows' own units
        return acts

    def l1_magnitude(self, acts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """What ReLU's L1 penalises: each activation times the norm of the row it multiplies."""
        return acts * norms

    def fold_scaling_factor(self, activation_fn: TrainingActivation, scaling_factor: float) -> None:
        """The input scaling factor was folded into the weights (``W_dec`` divided by it)."""

    def fold_W_dec_norm(
        self,
        fold: Callable[[], torch.Tensor],
        activation_fn: TrainingActivation | InferenceActivation,
    ) -> None:
        """Fold the rows' norms into the encoder (``fold`` does it, returns them), keeping outputs.

        Activations in the rows' own units grow with the folded norms, so
        the activation adapts (thresholds scale; a top-k refuses).
        """
        activation_fn.fold_decoder_norms(fold)

    def for_inference(self, state_dict: dict[str, Any]) -> None:
        """Called on the state dict of the inference SAE being saved: the rows' saved form."""

    def saelens_form(
        self, sae: MatryoshkaSAE, cfg_class: type[SAEConfig]
    ) -> tuple[MatryoshkaSAE, dict[str, Any]]:
        """``sae`` in a form a plain SAELens SAE of ``cfg_class`` computes, and the fields it needs.

        ``sae`` itself or, where ``cfg_class`` has no equivalent option, a copy
        with the decoder norms folded (``sae`` is left as it is).
        """
        del cfg_class  # every SAELens SAE multiplies rows by activations as they are
        return sae, {}


class RescaledDecoder(FreeDecoder):
    """Rows of any norm, activations in unit-norm decoder units (``rescale_acts_by_decoder_norm``).

    An activation ``a`` of latent ``j`` multiplies the unit row
    ``W_dec_j / ||W_dec_j||``: the pre-activations are multiplied by the
    norms, decoding divides by them (as SAELens's TopK and Matryoshka
    BatchTopK SAEs compute it: times their reciprocal).
    """

    def scale_pre_activations(self, hidden_pre: torch.Tensor, norms: Norms) -> torch.Tensor:
        return hidden_pre * norms()

    @torch.no_grad()
    def scale_pre_activations_(self, hidden_pre: torch.Tensor, W_dec: torch.Tensor) -> RawValues:
        norms = W_dec.norm(dim=-1)
        hidden_pre.mul_(norms)
        return partial(_scaled, 1 / norms)

    def decoding_acts(self, acts: torch.Tensor, norms: Norms) -> torch.Tensor:
        return acts * (1 / norms())

    def l1_magnitude(self, acts: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        del norms  # the rows activations multiply have unit norm
        return acts

    def fold_scaling_factor(self, activation_fn: TrainingActivation, scaling_factor: float) -> None:
        # activations are measured in units of ||W_dec||, which just shrank
        activation_fn.fold_scaling_factor(scaling_factor)

    def fold_W_dec_norm(
        self,
        fold: Callable[[], torch.Tensor],
        activation_fn: TrainingActivation | InferenceActivation,
    ) -> None:
        # activations already are in unit-norm units: folding changes nothing they see
        del activation_fn
        fold()

    def for_inference(self, state_dict: dict[str, Any]) -> None:
        norms = state_dict["W_dec"].norm(dim=-1)
        state_dict["W_enc"] = state_dict["W_enc"] * norms
        state_dict["b_enc"] = state_dict["b_enc"] * norms
        state_dict["W_dec"] = state_dict["W_dec"] / norms.unsqueeze(1)

    def saelens_form(
        self, sae: MatryoshkaSAE, cfg_class: type[SAEConfig]
    ) -> tuple[MatryoshkaSAE, dict[str, Any]]:
        if _SAELENS_OPTION in {field.name for field in dataclasses.fields(cfg_class)}:
            return sae, {_SAELENS_OPTION: True}
        folded = copy.deepcopy(sae)
        folded.fold_W_dec_norm()
        return folded, {}


class UnitNormDecoder(FreeDecoder):
    """Rows held at unit norm, as the paper's code and sparsify train them (``normalize_decoder``).

    Rows start at unit norm with ``W_enc = W_dec.T`` (``decoder_init_norm`` does
    not apply). A gradient hook removes each row's gradient component along
    the row, so an optimizer step moves rows (to first order) only along the
    unit sphere, and the rows are rescaled to unit norm before each step (the
    same as after each optimizer update) and in the saved inference SAE.

    The hook belongs to one ``W_dec`` object, and the SAE's can be replaced
    after it is built: a deep copy, or SAELens's loaders (they assign the
    loaded tensors). So every step checks that the ``W_dec`` it trains is the
    hooked one, and hooks it if not.
    """

    def __init__(self) -> None:
        #: ``id`` of the ``W_dec`` whose gradient is projected (an ``id``, not the
        #: tensor: a deep copy would map a reference to the copy's own ``W_dec``)
        self._hooked: int | None = None

    def initialize(self, W_dec: nn.Parameter, W_enc: nn.Parameter) -> None:
        with torch.no_grad():
            W_dec.copy_(_unit_rows(W_dec))
            W_enc.copy_(W_dec.T)
        self._project_gradient_of(W_dec)

    def before_step(self, W_dec: nn.Parameter) -> None:
        self._project_gradient_of(W_dec)
        with torch.no_grad():
            W_dec.copy_(_unit_rows(W_dec))

    def _project_gradient_of(self, W_dec: nn.Parameter) -> None:
        if self._hooked != id(W_dec):
            W_dec.register_hook(_tangent_gradient(W_dec))
            self._hooked = id(W_dec)

    def for_inference(self, state_dict: dict[str, Any]) -> None:
        state_dict["W_dec"] = _unit_rows(state_dict["W_dec"])
        # with the rescale too (RescaledUnitNormDecoder): then the (near 1) norms are folded
        super().for_inference(state_dict)


class RescaledUnitNormDecoder(UnitNormDecoder, RescaledDecoder):
    """Rows held at unit norm, activations measured in units of their actual norms (both options).

    :class:`UnitNormDecoder` holds the rows; everything else is
    :class:`RescaledDecoder`'s. Saving renormalises the rows, then folds their
    (then near 1) norms into the encoder.
    """


def _as_they_are(values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    del latents  # the raw pre-activations are the values
    return values


def _scaled(scale: torch.Tensor, values: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    return values * scale[latents]


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    # dictionary_learning's epsilon: a zero row stays zero instead of turning NaN
    return W_dec / (W_dec.norm(dim=-1, keepdim=True) + torch.finfo(W_dec.dtype).eps)


def _tangent_gradient(W_dec: nn.Parameter) -> Any:
    """A hook giving ``W_dec``'s gradient without its component along each row."""

    def project(grad: torch.Tensor) -> torch.Tensor:
        unit = W_dec.detach() / (W_dec.detach().norm(dim=-1, keepdim=True) + 1e-6)
        return grad - (grad * unit).sum(dim=-1, keepdim=True) * unit

    return project


def training_decoder(cfg: MatryoshkaTrainingSAEConfig) -> FreeDecoder:
    """The decoder a training config asks for."""
    if cfg.normalize_decoder:
        return RescaledUnitNormDecoder() if cfg.rescale_acts_by_decoder_norm else UnitNormDecoder()
    return RescaledDecoder() if cfg.rescale_acts_by_decoder_norm else FreeDecoder()


def inference_decoder(cfg: MatryoshkaSAEConfig) -> FreeDecoder:
    """The decoder an inference config asks for."""
    return RescaledDecoder() if cfg.rescale_acts_by_decoder_norm else FreeDecoder()


def folded_decoder(cfg: MatryoshkaSAEConfig) -> FreeDecoder:
    """Record in ``cfg`` that the decoder norms were folded in, and return its decoder now.

    Folding leaves every row at unit norm, where measuring in the rows' units
    changes nothing: the SAE is then in the saved form, whose config leaves
    the rescale off.
    """
    cfg.rescale_acts_by_decoder_norm = False
    return inference_decoder(cfg)
