"""One training step of a Matryoshka SAE, readable top to bottom: :func:`training_step`.

A step encodes its batch once (dense, or sparse: only the active entries
carry a graph), lets one activation select the active latents for every
level, decodes every level in one pass, and sums the levels' weighted MSEs,
the activation's sparsity penalty and the dead-latent loss. What varies is
asked of the objects the SAE was built with, never of the config: the
activation (``sae.activation_fn``), the level schedule (``sae.levels``), the
decoder (``sae.decoder``), how ``b_dec`` starts (``sae.b_dec_init``), the
dead-latent loss form (``sae.aux_loss``), the batch-global operations
(``sae.collectives``) and the part of the dictionary held (``sae.latent_part``).

``MatryoshkaTrainingSAE.training_forward_pass`` is this function; the
functions below it are its parts, used by the SAE's other entry points too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_lens_matryoshka.collectives import SINGLE_PROCESS, Collectives
from sae_lens_matryoshka.encodings import DenseEncoding, Encoding, PreActivations, SparseEncoding
from sae_lens_matryoshka.first_batch import check_first_batch
from sae_lens_matryoshka.kernels.entry_sets import EntrySets
from sae_lens_matryoshka.kernels.kept_memory import pre_activations
from sae_lens_matryoshka.kernels.selection import dead_latent_pick
from sae_lens_matryoshka.levels import LevelPlan
from sae_lens_matryoshka.losses import aux_k, level_metrics, level_mse
from sae_lens_matryoshka.sae_base import check_activations

if TYPE_CHECKING:
    from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE


def training_step(sae: MatryoshkaTrainingSAE, step_input: TrainStepInput) -> TrainStepOutput:
    """The loss, its terms and the metrics of one batch, as SAELens's trainer asks for them.

    A step reads one message back from the device (on a GPU, the one point
    where the host waits for it): whether the loss is finite, whether the
    BatchTopK selection's estimate held, the reconstruction's fraction of
    variance unexplained (which ``sae.divergence`` watches), and how many
    latents of each group are dead (:func:`read_step_numbers`).
    """
    # collectives only inside a training step, where every replica runs the same
    # ones: an eval-mode pass may run on one rank alone
    collectives = sae.collectives if sae.training else SINGLE_PROCESS
    x = step_input.sae_in
    check_activations(x, sae.cfg.d_in, heads_flattened=sae.hook_z_reshaping_mode)
    if sae.training:
        sae.decoder.before_step(sae.W_dec)
        if step_input.n_training_steps == 0:
            sae.b_dec_init.first_step(sae.b_dec, x, collectives)
    sae.activation_fn.prepare_step()
    plan = sae.levels.step_plan(sae.W_dec.device)
    evaluated = sae.levels.evaluated(sae.W_dec.device)
    logs_other_levels = plan.widths != evaluated.widths and step_input.is_logging_step
    logged = evaluated if logs_other_levels else None
    dead_groups = dead_latent_groups(sae, step_input, plan, collectives)

    # 1-3. encode once (one selection for every level), decode every level, the loss
    forward = reconstruction_loss(sae, step_input, plan, logged, collectives, count_on_host=False)
    numbers = read_step_numbers(forward, x, dead_groups)
    if numbers.selection_missed:  # the sampled threshold was off: select counting on the host
        forward = reconstruction_loss(
            sae, step_input, plan, logged, collectives, count_on_host=True
        )
        numbers = read_step_numbers(forward, x, dead_groups)
    encoding, reconstructions = forward.encoding, forward.reconstructions
    losses = {**sae.levels.loss_terms(forward.weighted_mse), **forward.penalties}
    stop_if_not_finite(sae, numbers.loss_finite, losses, step_input)
    if sae.training:
        if step_input.n_training_steps == 0:
            check_first_batch(x, encoding, sae.activation_fn)
        sae.divergence.observe(step_input.n_training_steps, numbers.fvu)
    # the dead-latent loss, whose shapes follow from the dead counts just read
    aux = dead_latent_loss(
        sae, x, encoding, reconstructions, plan, dead_groups, numbers.dead_counts, collectives
    )
    losses["auxiliary_reconstruction_loss"] = aux
    loss = forward.loss + aux

    # 4. what the activation learns from the step, and the logged metrics
    metrics: dict[str, Any] = {}
    if sae.training:
        metrics.update(
            sae.activation_fn.update_from_step(encoding, collectives, step_input.n_training_steps)
        )
    if logs_other_levels:
        logged_mse = level_mse(forward.all_reconstructions[len(plan.widths) :].detach(), x)
        metrics.update(level_metrics(x, logged_mse, evaluated.widths))
    elif step_input.is_logging_step and plan.widths == evaluated.widths:
        metrics.update(level_metrics(x, forward.mse.detach(), plan.widths))
    return TrainStepOutput(
        sae_in=x,
        sae_out=reconstructions[-1],
        # SAELens's trainer counts firing and dead latents over the whole dictionary
        feature_acts=collectives.whole_feature_acts(encoding.feature_acts),
        hidden_pre=encoding.hidden_pre,
        loss=loss,
        losses=losses,
        metrics=metrics,
    )


class ReconstructionLoss(NamedTuple):
    """A step's encoding, its levels' reconstructions and the loss before the dead-latent term."""

    encoding: Encoding
    #: a 0-d bool on the device where the selection's estimate may have missed (else None)
    selection_missed: torch.Tensor | None
    #: the trained levels' reconstructions, then (without a graph) the logged ones
    all_reconstructions: torch.Tensor
    #: the trained levels' ``[n_levels, *batch, d_in]``
    reconstructions: torch.Tensor
    mse: torch.Tensor
    weighted_mse: torch.Tensor
    #: the activation's sparsity penalties
    penalties: dict[str, torch.Tensor]
    #: the weighted levels' MSEs plus the penalties
    loss: torch.Tensor


def reconstruction_loss(
    sae: MatryoshkaTrainingSAE,
    step_input: TrainStepInput,
    plan: LevelPlan,
    logged: LevelPlan | None,
    collectives: Collectives,
    count_on_host: bool,
) -> ReconstructionLoss:
    """Encode, select, decode ``plan``'s levels (and ``logged``'s), and their weighted loss.

    ``count_on_host``: a BatchTopK selection reads its counts back to the
    host (exact, a synchronisation) instead of estimating its sizes.
    """
    x = step_input.sae_in
    missed = None
    if sae.training and sae.cfg.sparse_training:
        encoding: Encoding
        encoding, missed = encode_sparse(sae, x, collectives, count_on_host)
    else:
        encoding = encode_dense(sae, x, collectives)
    all_reconstructions = decode_step_levels(sae, encoding, plan, logged, collectives)
    # a slice, even of everything, would give backward a zero-filled copy of the gradient
    reconstructions = all_reconstructions[: len(plan.widths)] if logged else all_reconstructions
    mse = level_mse(reconstructions, x)
    weighted = plan.weights * mse
    penalties = sae.activation_fn.sparsity_loss(encoding, plan, step_input.coefficients)
    # summed from the whole vector: the loss terms are views of it, which
    # backward then never has to take apart
    loss = sum(penalties.values(), weighted.sum())
    return ReconstructionLoss(
        encoding, missed, all_reconstructions, reconstructions, mse, weighted, penalties, loss
    )


class StepNumbers(NamedTuple):
    """What a training step needs on the host, read back from the device at once."""

    loss_finite: bool
    selection_missed: bool
    #: the full dictionary's MSE over the batch's variance (NaN for a batch without variance)
    fvu: float
    #: how many latents of each dead-latent group are dead
    dead_counts: list[int]


def read_step_numbers(
    forward: ReconstructionLoss, x: torch.Tensor, dead_groups: list[torch.Tensor]
) -> StepNumbers:
    """The step's one host read: the loss, a missed selection, the FVU, the dead counts.

    Stacked on the device (in float64: the counts stay exact) and read with
    one ``tolist``, so that a step waits for the device once, however many
    of them it needs.
    """
    missed = forward.selection_missed
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    variance = (rows - rows.mean(dim=0)).pow(2).sum(dim=-1).mean()
    numbers = [
        forward.loss.detach(),
        forward.mse.detach()[-1] / variance,
        variance.new_zeros(()) if missed is None else missed,
        *[group.sum() for group in dead_groups],
    ]
    loss, fvu, selection_missed, *dead_counts = torch.stack(
        [number.double() for number in numbers]
    ).tolist()
    # a batch without variance (constant activations) has no FVU
    fvu = fvu if math.isfinite(fvu) else math.nan
    counts = [int(count) for count in dead_counts]
    return StepNumbers(math.isfinite(loss), bool(selection_missed), fvu, counts)


def encode_dense(
    sae: MatryoshkaTrainingSAE, x: torch.Tensor, collectives: Collectives
) -> DenseEncoding:
    """Every latent's pre-activation and activation, with autograd through dense matmuls."""
    sae_in = sae.process_sae_in(x)
    norms = sae.W_dec.norm(dim=-1)
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
    hidden_pre = sae.decoder.scale_pre_activations(hidden_pre, lambda: norms)
    acts = sae.hook_sae_acts_post(sae.activation_fn.step_forward(hidden_pre, collectives))
    return DenseEncoding(hidden_pre, acts, norms, sae.decoder)


def encode_sparse(
    sae: MatryoshkaTrainingSAE, x: torch.Tensor, collectives: Collectives, count_on_host: bool
) -> tuple[SparseEncoding, torch.Tensor | None]:
    """Encode densely without a graph, select, then re-attach only the active entries.

    Returns the encoding and whether its selection may have missed (see
    ``kernels.selection.Selection``). Hooks on ``hook_sae_acts_pre`` and
    ``hook_sae_acts_post`` observe the pre-activations and the (sparse COO)
    activations; what they return is not used (``training_path="dense"``
    lets hooks edit activations).
    """
    if x.requires_grad:
        raise ValueError(
            "The sparse training path does not backpropagate into the input activations; "
            "detach them, or use training_path='dense'."
        )
    with torch.no_grad():
        # b_dec's gradient through the input comes from the encoder's sparse backward
        sae_in = sae.process_sae_in(x)
        batch_shape = sae_in.shape[:-1]
        sae_in = sae_in.reshape(-1, sae.cfg.d_in)
        # one n_tokens x d_sae buffer (on CPU an earlier step's memory): the bias
        # and the norms are applied in place
        hidden_pre = pre_activations(sae.b_enc, sae_in, sae.W_enc)
        raw_values = sae.decoder.scale_pre_activations_(hidden_pre, sae.W_dec)
    sae.hook_sae_acts_pre(hidden_pre.view(*batch_shape, -1))
    shift = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    pre = PreActivations(
        hidden_pre, sae_in, shift, sae.W_enc, sae.b_enc, raw_values, batch_shape, EntrySets()
    )
    token, latent, missed = sae.activation_fn.select(hidden_pre, collectives, count_on_host)
    encoding = SparseEncoding.of_entries(pre, token, latent)
    sae.hook_sae_acts_post(encoding.feature_acts)
    return encoding, missed


def decode_step_levels(
    sae: MatryoshkaTrainingSAE,
    encoding: Encoding,
    plan: LevelPlan,
    logged: LevelPlan | None,
    collectives: Collectives,
) -> torch.Tensor:
    """The trained levels' reconstructions, then (without a graph) the ``logged`` ones.

    ``[n_levels, *batch, d_in]``, output-normalised once. With the latents
    sharded, this process decodes its latents' part of each level and
    ``collectives`` sums the parts.
    """
    b_dec = collectives.decoder_bias(sae.b_dec)
    detach = sae.cfg.detach_between_levels
    local = sae.latent_part.local_plan  # bounds in this SAE's own latent numbering
    reconstructions = encoding.decode_levels(sae.W_dec, b_dec, local(plan), detach)
    if logged is not None:
        with torch.no_grad():
            extra = encoding.decode_levels(sae.W_dec, b_dec, local(logged), False)
        reconstructions = torch.cat([reconstructions, extra])
    reconstructions = collectives.whole_reconstruction(reconstructions)
    # the activation normalisation's inverse can run only once per input
    return sae.run_time_activation_norm_fn_out(reconstructions)


def dead_latent_groups(
    sae: MatryoshkaTrainingSAE,
    step_input: TrainStepInput,
    plan: LevelPlan,
    collectives: Collectives,
) -> list[torch.Tensor]:
    """The dead-latent mask, split into the groups the aux loss treats apart ([] if none runs).

    One group (the whole dictionary), or with ``use_matryoshka_aux_loss``
    one per level: each level's group of dead latents reconstructs its own
    level's residual.
    """
    dead = step_input.dead_neuron_mask
    if dead is None or sae.cfg.aux_loss_coefficient == 0:
        return []
    if tuple(dead.shape) != (sae.cfg.d_sae,):
        raise ValueError(
            f"the dead-latent mask must have shape ({sae.cfg.d_sae},) (one flag per "
            f"latent), got {tuple(dead.shape)}."
        )
    if dead.dtype != torch.bool:  # 0.5 would count as dead
        raise TypeError(
            f"the dead-latent mask must be boolean (one flag per latent, as SAELens's "
            f"trainer hands it), got {dead.dtype}."
        )
    dead = collectives.dead_everywhere(dead)
    if not sae.cfg.use_matryoshka_aux_loss:
        return [dead]
    return list(dead.tensor_split(plan.widths[:-1]))


def dead_latent_loss(
    sae: MatryoshkaTrainingSAE,
    x: torch.Tensor,
    encoding: Encoding,
    reconstructions: torch.Tensor,
    plan: LevelPlan,
    groups: list[torch.Tensor],
    counts: list[int],
    collectives: Collectives,
) -> torch.Tensor:
    """Dead-latent auxiliary loss (Gao et al. 2024), whole-SAE or per level.

    The ``d_in // 2`` dead latents with the largest pre-activations are asked
    to reconstruct the residual of the live ones, in ``sae.aux_loss``'s form
    (SAELens's or dictionary_learning's). ``groups`` are
    :func:`dead_latent_groups`' and ``counts`` how many of each are dead (a
    host number: it decides the shapes). How a group's dead latents are
    picked follows from that count (``kernels.selection.dead_latent_pick``):
    by gathering their columns when few are, by ranking every column in
    place when nearly all are.
    """
    total = reconstructions.new_zeros(())
    if not groups:
        return total
    if sae.cfg.use_matryoshka_aux_loss:
        ends, levels = plan.widths, list(reconstructions)
    else:
        ends, levels = [sae.cfg.d_sae], [reconstructions[-1]]
    starts = [0, *ends[:-1]]
    for group, start, n_dead, level in zip(groups, starts, counts, levels, strict=True):
        if n_dead == 0:  # of the whole dictionary: the same on every shard
            continue
        # this SAE's own (all of them in one process; a shard's range of them)
        held = sae.latent_part.held(dead_latent_pick(group, start, n_dead))
        residual = (x - level).detach()
        n_pick = min(aux_k(sae.cfg.d_in), n_dead)
        part = encoding.dead_latent_reconstruction(
            held, n_pick, sae.W_dec, sae.aux_loss.rectified, collectives
        )
        recon = collectives.whole_reconstruction(part)
        total = total + sae.aux_loss(recon, residual, n_dead, collectives)
    return sae.cfg.aux_loss_coefficient * total


def stop_if_not_finite(
    sae: MatryoshkaTrainingSAE,
    loss_finite: bool,
    losses: dict[str, torch.Tensor],
    step_input: TrainStepInput,
) -> None:
    """Raise before any update when the loss is NaN/Inf (``loss_finite`` false), saying why.

    SAELens's trainer steps the optimizer right after ``backward``, so the
    step's host read is the last moment a NaN/Inf batch (which always makes
    the reconstruction loss NaN/Inf) can be kept from the parameters, where
    it would stay for good. The dead-latent loss, computed after that read,
    is not checked in the step: it is finite wherever the batch and the
    parameters are, and a non-finite one (NaN parameters of a dead latent)
    stops the next step, whose loss it makes NaN.
    """
    if loss_finite:
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
    parameters = _non_finite_names(sae.state_dict(keep_vars=True))
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


def _non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
