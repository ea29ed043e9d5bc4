"""Configuration dataclasses of the ``"matryoshka"`` architecture.

``MatryoshkaTrainingSAEConfig`` is what users put in a
``LanguageModelSAERunnerConfig``; ``MatryoshkaSAEConfig`` is what a trained
dictionary is saved with (``cfg.json``) and loaded back as. Both validate at
construction, so a mistake surfaces before any model is loaded or any step is
trained, with a message naming the field, what was expected and what was given.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, cast

from sae_lens import SAEConfig, TrainingSAEConfig
from typing_extensions import override

ARCHITECTURE = "matryoshka"


class ActivationKind(NamedTuple):
    """What a configuration needs to know of a training activation (its code: ``activations``)."""

    #: at most ``k`` latents active per token: it needs ``k`` and can train on the sparse path
    k_sparse: bool
    #: ``MatryoshkaSAEConfig.activation`` of the SAE it saves as
    saved_as: str


#: ``MatryoshkaTrainingSAEConfig.activation`` -> what kind of activation it is
TRAINING_ACTIVATIONS: dict[str, ActivationKind] = {
    "batchtopk": ActivationKind(k_sparse=True, saved_as="jumprelu"),
    "topk": ActivationKind(k_sparse=True, saved_as="topk"),
    "jumprelu": ActivationKind(k_sparse=False, saved_as="jumprelu"),
    "relu": ActivationKind(k_sparse=False, saved_as="relu"),
}
#: ``MatryoshkaSAEConfig.activation``: the activations a saved SAE infers with
INFERENCE_ACTIVATIONS = ("jumprelu", "topk", "relu")


def is_matryoshka(sae_cfg: Any) -> bool:
    """Whether an SAE config (or None) is a Matryoshka one.

    By architecture name, not class: a reloaded plugin defines new classes.
    """
    architecture = getattr(sae_cfg, "architecture", None)
    return architecture is not None and architecture() == ARCHITECTURE


def trains_matryoshka(trainer: Any) -> bool:
    """Whether a SAELens ``SAETrainer`` trains a Matryoshka SAE."""
    return is_matryoshka(trainer.sae.cfg)


#: activations that fix the number of active latents (and need ``k``)
K_ACTIVATIONS = tuple(name for name, kind in TRAINING_ACTIVATIONS.items() if kind.k_sparse)
#: activations made sparse by a penalty, whose coefficient ``target_l0`` can steer
PENALISED_ACTIVATIONS = tuple(name for name in TRAINING_ACTIVATIONS if name not in K_ACTIVATIONS)

#: SAELens activation normalisations whose output is rescaled per token; the
#: dead-latent aux loss compares a normalised reconstruction against a raw
#: residual under these, which SAELens also refuses for its TopK aux loss.
_PER_TOKEN_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


def _check_dimensions(cfg: SAEConfig) -> None:
    for name in ("d_in", "d_sae"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}."
            )


#: float32's smallest normal number: a positive weight below it vanishes from the loss
_FLOAT32_TINY = 1.1754943508222875e-38
#: the Pareto prefix powers whose length probabilities stay representable at any d_sae
_PARETO_POWERS = (1e-3, 10.0)
#: the dtypes SAELens builds SAEs in (``sae_lens.util.str_to_dtype``)
_DTYPES = tuple(
    f"{prefix}{name}"
    for prefix in ("", "torch.")
    for name in ("float32", "float64", "float16", "bfloat16")
)


def _check_training_numbers(cfg: TrainingSAEConfig, name: str) -> None:
    """SAELens's own training fields that would build an SAE that cannot train.

    Checked with the config, before a runner loads its model: SAELens itself
    refuses a bad ``dtype`` only when it builds the SAE, and accepts a
    ``decoder_init_norm`` of 0 (nothing ever changes) or NaN.
    """
    if str(cfg.dtype) not in _DTYPES:  # a torch.dtype prints as "torch.float32"
        raise ValueError(f"{name}.dtype must be one of {list(_DTYPES)}, got {cfg.dtype!r}.")
    norm = cfg.decoder_init_norm
    if norm is not None and not (_is_number(norm) and math.isfinite(norm) and norm > 0):
        raise ValueError(
            f"{name}.decoder_init_norm must be a finite number > 0 (the decoder rows' "
            f"starting norm; 0 would leave every latent silent for good), or None, got {norm!r}."
        )


def _check_booleans(cfg: SAEConfig) -> None:
    """Every boolean field must hold ``True`` or ``False``.

    Python would take ``"false"``, ``"no"`` or ``2`` as true without a word, and
    a ``cfg.json`` or a sweep file written by hand easily holds them.
    """
    for spec in fields(cfg):
        value = getattr(cfg, spec.name)
        if spec.type in (bool, "bool") and not isinstance(value, bool):
            raise ValueError(
                f"{type(cfg).__name__}.{spec.name} must be true or false (a boolean), "
                f"got {value!r} ({type(value).__name__})."
            )


def _check_choice(owner: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(
            f"{owner} must be one of {', '.join(repr(v) for v in valid)}; got {value!r}."
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(owner: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    """``value`` must be a finite number ``>= minimum`` (``> minimum`` if not inclusive)."""
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{owner} must be a finite number {bound}, got {value!r}.")


def _check_int(owner: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner} must be an integer >= {minimum}, got {value!r}.")


def validate_widths(
    widths: Sequence[int], d_sae: int, owner: str, append_d_sae: bool = True
) -> list[int]:
    """Check Matryoshka prefix widths and return them as a fresh list.

    Widths must be positive integers, strictly increasing, and end at ``d_sae``.
    If the last width is below ``d_sae`` and ``append_d_sae`` is set, ``d_sae``
    is appended with a warning (as SAELens's ``matryoshka_batchtopk`` does), so
    that the full dictionary is always trained as the last level.

    Args:
        widths: the prefix widths as given by the user or a config file.
        d_sae: the dictionary size.
        owner: what the widths belong to, named in error messages
            (e.g. ``"MatryoshkaTrainingSAEConfig.matryoshka_widths"``).
        append_d_sae: append ``d_sae`` when missing instead of failing.
    """
    widths = list(widths)
    if not widths:
        example = sorted({max(d_sae // 8, 1), max(d_sae // 4, 1), d_sae})
        raise ValueError(
            f"{owner} is empty: give the nested prefix widths, e.g. {example} for d_sae={d_sae}."
        )
    for position, width in enumerate(widths):
        if isinstance(width, bool) or not isinstance(width, int):
            raise ValueError(
                f"{owner}[{position}] must be an integer, got {width!r} ({type(width).__name__})."
            )
        if width <= 0:
            raise ValueError(
                f"{owner} must contain only positive widths, got {width} at "
                f"position {position} in {widths}."
            )
        if width > d_sae:
            raise ValueError(
                f"{owner} has width {width} at position {position}, larger than "
                f"d_sae={d_sae}: a level cannot have more latents than the dictionary."
            )
    for position in range(1, len(widths)):
        if widths[position] <= widths[position - 1]:
            raise ValueError(
                f"{owner} must be strictly increasing, got {widths}: "
                f"{widths[position - 1]} at position {position - 1} is followed "
                f"by {widths[position]}."
            )
    if widths[-1] != d_sae:
        if not append_d_sae:
            raise ValueError(f"{owner} must end at d_sae={d_sae}, got {widths}.")
        warnings.warn(
            f"{owner} {widths} does not end at d_sae={d_sae}; a final level of "
            f"width {d_sae} is appended so the whole dictionary is trained.",
            stacklevel=4,
        )
        widths.append(d_sae)
    return widths


def default_eval_widths(d_sae: int) -> list[int]:
    """Levels kept for evaluation when prefixes are sampled: ``d_sae / 32, / 16, ..., / 2, d_sae``."""
    return sorted({d_sae >> shift for shift in range(5, 0, -1) if d_sae >> shift >= 1} | {d_sae})


def check_field_names(owner: type, config_dict: dict[str, Any]) -> None:
    """Refuse likely typos of our fields; warn about (and ignore) other unknown fields.

    SAELens drops fields a config class does not know without a word, so a
    misspelt ``matryoshka_width`` in a ``cfg.json`` or runner config would
    silently train or load something else. Fields close to one of ours are an
    error; others (e.g. written by a newer version) are ignored with a warning.
    """
    known = {f.name for f in fields(MatryoshkaTrainingSAEConfig)}
    known |= {f.name for f in fields(MatryoshkaSAEConfig)} | {"architecture"}
    unknown = sorted(set(config_dict) - known)
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ValueError(
                f"{owner.__name__}: unknown field {name!r}; did you mean {close[0]!r}? "
                "(an unknown field would otherwise be ignored)"
            )
    if unknown:
        warnings.warn(f"{owner.__name__} ignores fields it does not know: {unknown}.", stacklevel=3)


def _check_k(owner: str, k: Any, activation: str, d_sae: int) -> float | None:
    """Validate ``k`` for ``activation``; integral values come back as ``int``."""
    if activation not in K_ACTIVATIONS:
        if k is not None:
            raise ValueError(
                f"{owner} is only used by activation {' / '.join(K_ACTIVATIONS)}; "
                f"activation={activation!r} sets its sparsity by other means, so leave k unset "
                f"(got {k!r})."
            )
        return None
    if k is None:
        raise ValueError(
            f"{owner} is required for activation={activation!r}: the number of active "
            "latents per token, e.g. k=40."
        )
    if not _is_number(k):
        raise ValueError(f"{owner} must be a number, got {k!r}.")
    if not 0 < k <= d_sae:
        raise ValueError(f"{owner} must be in (0, d_sae={d_sae}], got {k!r}.")
    if float(k).is_integer():
        return int(k)
    if activation == "topk":
        raise ValueError(f"{owner} must be a whole number for activation='topk', got {k!r}.")
    return k


class _MatryoshkaArchitecture:
    """Mixed into both configs: the architecture name, and field names checked before
    SAELens's ``from_dict`` drops the ones it does not know."""

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        check_field_names(cls, config_dict)
        return cast(Any, super()).from_dict(config_dict)


@dataclass
class MatryoshkaTrainingSAEConfig(_MatryoshkaArchitecture, TrainingSAEConfig):
    """Training configuration of a Matryoshka SAE (architecture ``"matryoshka"``).

    A Matryoshka SAE trains nested prefixes of its dictionary: every prefix
    ``W_dec[:m_l]`` must reconstruct the input on its own. Early latents are
    pushed towards general features and later latents towards specific ones,
    which keeps parents from being absorbed into their children
    (Bussmann et al. 2025, arXiv 2503.17547).

    The reconstruction loss is ``sum_l w_l * MSE_l`` with
    ``MSE_l = ||x - x_hat_l||^2`` summed over ``d_in`` and averaged over the
    batch, where ``x_hat_l`` decodes the latents ``< m_l`` of one activation
    shared by every level. With fixed widths, ``activation="batchtopk"`` and
    unit weights this equals SAELens's ``matryoshka_batchtopk`` loss for the
    same parameters.

    Args:
        matryoshka_widths: strictly increasing prefix widths; the last is
            ``d_sae`` (appended with a warning if missing). With
            ``prefix_sampling="fixed"`` these are the trained levels; the paper
            uses ``d_sae * [1/32, 3/32, 7/32, 15/32, 1]``. With ``"pareto"``
            they are only the levels the saved SAE reports and evaluates
            (default ``d_sae / 32, / 16, / 8, / 4, / 2, d_sae``).
        activation: the sparsity mechanism, shared by all levels.
            ``"batchtopk"``: the ``k * n_tokens`` largest activations of the
            batch (saved as per-latent JumpReLU thresholds). ``"topk"``: each
            token's ``k`` largest (kept at inference). ``"jumprelu"``: learned
            per-latent thresholds trained by straight-through estimators with an
            L0 penalty (``l0_coefficient``), as SAELens's JumpReLU.
            ``"relu"``: ReLU with an L1 penalty (``l1_coefficient``) on
            activations times decoder norms.
        k: active latents per token for batchtopk (an average; may be
            fractional) and topk (exact). Not used by jumprelu / relu.
        level_weights: weight ``w_l`` of each level's loss, one per level of
            ``matryoshka_widths``; default all 1. Fixed prefixes only.
            dictionary_learning's ``group_weights`` are the same idea: raising
            early weights protects general features, raising the last weight
            buys full-width reconstruction.
        prefix_sampling: ``"fixed"`` trains ``matryoshka_widths`` every step
            (the paper). ``"pareto"`` samples ``n_sampled_prefixes - 1``
            distinct prefix lengths every step with ``P(l)`` proportional to
            ``l**pareto_power - (l - 1)**pareto_power``, plus ``d_sae``
            (Nabeshima's Matryoshka SAEs): every latent gets a position-graded
            pressure instead of a few hard group boundaries, at the cost of a
            noisier loss.
        n_sampled_prefixes: prefixes per step for ``"pareto"``, the full width included.
        pareto_power: ``p`` above; smaller favours shorter prefixes.
        prefix_sampling_seed: seed of the prefix sampler. Its state is saved in
            checkpoints, so a resumed run continues the same sequence.
        detach_between_levels: stop-gradient between levels (the paper's
            ablation): level ``l``'s loss updates only the latents level
            ``l - 1`` lacked, so later levels cannot bend earlier latents
            (early latents then serve only the small levels, which costs
            full-width reconstruction).
        order_latents_every: keep latents ordered by how often they fire, as
            Nabeshima's Matryoshka SAEs do (``0``, the default: never). Every
            this many steps, and once more after the last step (so the saved
            SAE is ordered), SAELens's trainer permutes the latents by their
            firing counts since the previous ordering, most frequent first:
            encoder columns, decoder rows, ``b_enc``, JumpReLU thresholds,
            their Adam state and the trainer's per-latent statistics move
            together. With fixed widths each group between two widths is
            ordered on its own (a global order would move latents between
            levels and change the objective), so the run is the unordered
            run, relabelled. With ``"pareto"`` prefixes the order is global:
            a latent's position is what the sampler trains it by, and moving
            the frequent latents forward is the point. See ``latent_order``.
            Not with latent sharding (refused when a shard is built).
        topk_threshold_lr: (batchtopk) rate of the EMA of the cut-off (the
            smallest kept activation of each batch), logged as
            ``topk_threshold``; ``1 - threshold_beta`` in dictionary_learning.
        topk_threshold_start_step: (batchtopk) the first step (counting from
            0) the EMA learns from; dictionary_learning's
            ``threshold_start_step=1000`` is 1001 here (it updates at steps
            above it).
        inference_threshold: (batchtopk) the saved SAE's JumpReLU threshold.
            ``"last_batch"``: the cut-off of the last training batch, at which
            that batch fired exactly ``k`` latents per token. ``"ema"``: the EMA
            above, as the paper's code saves it; it lags the cut-off by about
            ``1 / topk_threshold_lr`` steps, which after a short run makes the
            saved SAE fire far more than ``k`` latents per token.
        aux_loss_coefficient: weight of the dead-latent auxiliary loss, which
            asks the ``d_in // 2`` most active dead latents to reconstruct the
            residual (Gao et al. 2024). SAELens uses 1.0. It multiplies
            ``aux_loss_form``'s term, whose scale depends on the form.
        aux_loss_form: ``"saelens"``: the dead latents decode with their sign,
            and the squared error is scaled by ``min(n_dead / (d_in // 2), 1)``
            (SAELens's TopK and BatchTopK SAEs). ``"dictionary_learning"``: they
            pass a ReLU first, and the squared error is divided by the
            residual's variance (the paper's code, whose coefficient 1/32
            multiplies this unit-free term). The README's conventions table
            maps one to the other.
        use_matryoshka_aux_loss: one auxiliary loss per level: the dead latents
            of each group reconstruct their own level's residual.
        rescale_acts_by_decoder_norm: select, penalise and decode activations as
            if every decoder row had unit norm; folded into the encoder on save.
        normalize_decoder: hold decoder rows at unit norm, as dictionary_learning
            and sparsify do: rows start at unit norm (``decoder_init_norm``
            does not apply, and ``W_enc = W_dec.T``), each row's gradient loses
            its component along the row, and rows are rescaled to unit norm
            before every step and in the saved SAE. An alternative to
            ``rescale_acts_by_decoder_norm``, which then changes nothing.
        b_dec_init: ``"zeros"`` (SAELens) or ``"geometric_median"``: ``b_dec``
            starts at the geometric median of the first training batch (the
            paper's code), over all ranks' batches under data parallelism.
        l1_coefficient, l1_warm_up_steps: (relu) the L1 penalty
            ``sum_i c_i * a_i * ||d_i||``, where ``c_i`` is the summed weight of
            the levels containing latent ``i`` (nested L1, as in Nabeshima's
            formulation: a latent of group ``j`` is penalised once per level
            that contains it) and ``d_i`` its decoder vector as used in decoding.
        l0_coefficient, l0_warm_up_steps: (jumprelu) the nested L0 penalty
            ``sum_i c_i * [h_i > theta_i]``, same nesting.
        target_l0: (relu, jumprelu) adapt the penalty's coefficient during
            training so that the SAE fires this many latents per token on
            average (Nabeshima's L1 controller; ``None``: the coefficient is
            only SAELens's schedule). After every step past the coefficient's
            warm-up, a multiplier of the scheduled ``l1_coefficient`` /
            ``l0_coefficient`` moves by the factor
            ``exp(target_l0_rate * clamp(log(L0 / target_l0), -1, 1))``, ``L0``
            being the step's (see ``activations.TargetL0`` for why). The
            configured coefficient is then only the starting point; the
            multiplier is logged (``target_l0_multiplier``) and saved in
            checkpoints, not in the inference SAE.
        target_l0_rate: (with ``target_l0``) the largest change of the
            coefficient's logarithm in one step, in ``(0, 1]``: the default
            0.01 lets it change 2.7-fold in 100 steps. Lower it if the L0
            oscillates around the target (the weights answer slowly, e.g. at a
            small learning rate); raise it for a short run.
        jumprelu_init_threshold, jumprelu_bandwidth: (jumprelu) initial
            threshold and the straight-through estimators' kernel width.
        divergence_fvu, divergence_patience: a run whose fraction of variance
            unexplained (full-dictionary MSE over the batch's variance; 1 is the
            mean's) stays above ``divergence_fvu`` for ``divergence_patience``
            consecutive steps stops with an error, no checkpoint or final SAE
            written since it went above (see ``divergence``); patience 0 turns
            the check off.
        training_path: how a training step is computed. ``"sparse"`` (what
            ``"auto"`` picks for batchtopk and topk) runs only the encoder's
            forward matmul densely and everything else from the ``k`` active
            latents per token: several times faster, same loss and gradients.
            ``"dense"`` uses dense matmuls throughout (the only path for
            jumprelu and relu, whose activations are not k-sparse), and is the
            one to pick when a hook on ``hook_sae_acts_post`` must edit
            activations during training (the sparse path only lets hooks observe).
    """

    matryoshka_widths: list[int] = field(default_factory=list)
    activation: Literal["batchtopk", "topk", "jumprelu", "relu"] = "batchtopk"
    k: float | None = None
    level_weights: list[float] | None = None
    prefix_sampling: Literal["fixed", "pareto"] = "fixed"
    n_sampled_prefixes: int = 10
    pareto_power: float = 0.5
    prefix_sampling_seed: int = 0
    detach_between_levels: bool = False
    order_latents_every: int = 0
    topk_threshold_lr: float = 0.01
    topk_threshold_start_step: int = 0
    inference_threshold: Literal["last_batch", "ema"] = "last_batch"
    aux_loss_coefficient: float = 1.0
    aux_loss_form: Literal["saelens", "dictionary_learning"] = "saelens"
    use_matryoshka_aux_loss: bool = False
    rescale_acts_by_decoder_norm: bool = True
    normalize_decoder: bool = False
    b_dec_init: Literal["zeros", "geometric_median"] = "zeros"
    l1_coefficient: float = 1.0
    l1_warm_up_steps: int = 0
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    target_l0: float | None = None
    target_l0_rate: float = 0.01
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    divergence_fvu: float = 2.0
    divergence_patience: int = 100
    training_path: Literal["auto", "sparse", "dense"] = "auto"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_dimensions(self)
        _check_booleans(self)
        _check_training_numbers(self, name)
        _check_choice(f"{name}.activation", self.activation, tuple(TRAINING_ACTIVATIONS))
        _check_choice(f"{name}.prefix_sampling", self.prefix_sampling, ("fixed", "pareto"))
        if self.prefix_sampling == "pareto" and not self.matryoshka_widths:
            self.matryoshka_widths = default_eval_widths(self.d_sae)
        self.matryoshka_widths = validate_widths(
            self.matryoshka_widths, self.d_sae, f"{name}.matryoshka_widths"
        )
        if self.prefix_sampling == "fixed" and len(self.matryoshka_widths) == 1:
            warnings.warn(
                f"{name}.matryoshka_widths has only one level ({self.d_sae}): this trains "
                "a plain (non-Matryoshka) SAE. Give nested widths, e.g. "
                f"{sorted({max(self.d_sae // 8, 1), max(self.d_sae // 2, 1), self.d_sae})}.",
                stacklevel=3,
            )
        self.k = _check_k(f"{name}.k", self.k, self.activation, self.d_sae)
        _check_choice(f"{name}.training_path", self.training_path, ("auto", "sparse", "dense"))
        if self.training_path == "sparse" and self.activation not in K_ACTIVATIONS:
            raise ValueError(
                f"{name}.training_path='sparse' needs activation {' or '.join(K_ACTIVATIONS)} "
                f"(at most k active latents per token); activation={self.activation!r} is not "
                "k-sparse. Use training_path='auto' or 'dense'."
            )
        self._check_levels(name)
        self._check_coefficients(name)
        self._check_target_l0(name)
        if self.dtype in ("float16", "torch.float16"):
            warnings.warn(
                f"{name}.dtype={self.dtype!r}: Adam cannot train float16 parameters (its "
                "epsilon and second moments underflow, and the weights turn NaN within a few "
                "steps; SAELens's own SAEs do the same). Train in float32 or bfloat16, with "
                "autocast=True for speed, and load the result with dtype='float16'.",
                stacklevel=3,
            )
        if (
            self.aux_loss_coefficient > 0
            and self.normalize_activations in _PER_TOKEN_NORMALIZATIONS
        ):
            raise ValueError(
                f"{name}: the dead-latent aux loss does not support "
                f"normalize_activations={self.normalize_activations!r} (its "
                "reconstruction would be in normalised space and the residual in "
                "the original one). Use 'none' or 'expected_average_only_in', or "
                "set aux_loss_coefficient=0."
            )
        super().__post_init__()

    def _check_levels(self, name: str) -> None:
        if self.level_weights is not None:
            if self.prefix_sampling != "fixed":
                raise ValueError(
                    f"{name}.level_weights needs prefix_sampling='fixed': with "
                    f"{self.prefix_sampling!r} the levels change every step. Got "
                    f"{self.level_weights!r}."
                )
            weights = list(self.level_weights)
            if len(weights) != len(self.matryoshka_widths):
                raise ValueError(
                    f"{name}.level_weights has {len(weights)} entries but "
                    f"matryoshka_widths {self.matryoshka_widths} has "
                    f"{len(self.matryoshka_widths)} levels; give one weight per level."
                )
            for position, weight in enumerate(weights):
                _check_number(f"{name}.level_weights[{position}]", weight, 0.0)
                if 0 < weight < _FLOAT32_TINY:  # the loss is computed in float32
                    raise ValueError(
                        f"{name}.level_weights[{position}]={weight!r} rounds to 0 in float32 (its "
                        f"smallest normal number is {_FLOAT32_TINY:.3g}), so its level would "
                        "train nothing; give 0 for that, or a weight of at least that."
                    )
            if not any(weights):
                raise ValueError(f"{name}.level_weights are all zero: nothing would be trained.")
            self.level_weights = [float(w) for w in weights]
        _check_int(f"{name}.n_sampled_prefixes", self.n_sampled_prefixes, 1)
        if self.prefix_sampling == "pareto" and self.n_sampled_prefixes > self.d_sae:
            raise ValueError(
                f"{name}.n_sampled_prefixes={self.n_sampled_prefixes} exceeds d_sae={self.d_sae}: "
                "the sampled prefix lengths must be distinct."
            )
        _check_number(f"{name}.pareto_power", self.pareto_power, 0.0, inclusive=False)
        low, high = _PARETO_POWERS
        if not low <= self.pareto_power <= high:
            raise ValueError(
                f"{name}.pareto_power must be in [{low}, {high}] (0.5 in Nabeshima's code; "
                "below, every prefix length but 1 gets a probability that rounds to 0; above, "
                f"the weights overflow), got {self.pareto_power!r}."
            )
        every = self.order_latents_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"{name}.order_latents_every must be an integer >= 0 (the steps between two "
                f"orderings of the latents by firing frequency; 0 never orders), got {every!r}."
            )
        _check_int(f"{name}.prefix_sampling_seed", self.prefix_sampling_seed, 0)
        if self.prefix_sampling_seed >= 2**64:
            raise ValueError(
                f"{name}.prefix_sampling_seed must be below 2**64 (a torch generator's "
                f"seed), got {self.prefix_sampling_seed!r}."
            )

    def _check_coefficients(self, name: str) -> None:
        _check_number(f"{name}.topk_threshold_lr", self.topk_threshold_lr, 0.0, inclusive=False)
        if self.topk_threshold_lr > 1:
            raise ValueError(
                f"{name}.topk_threshold_lr must be in (0, 1], got {self.topk_threshold_lr!r}."
            )
        _check_int(f"{name}.topk_threshold_start_step", self.topk_threshold_start_step, 0)
        _check_choice(
            f"{name}.inference_threshold", self.inference_threshold, ("last_batch", "ema")
        )
        if self.inference_threshold == "ema" and self.activation != "batchtopk":
            raise ValueError(
                f"{name}.inference_threshold='ema' applies to activation='batchtopk' only (the "
                f"threshold that replaces the batch selection); activation={self.activation!r}."
            )
        _check_choice(
            f"{name}.aux_loss_form", self.aux_loss_form, ("saelens", "dictionary_learning")
        )
        _check_choice(f"{name}.b_dec_init", self.b_dec_init, ("zeros", "geometric_median"))
        for field_name in (
            "aux_loss_coefficient",
            "l1_coefficient",
            "l0_coefficient",
            "jumprelu_init_threshold",
        ):
            _check_number(f"{name}.{field_name}", getattr(self, field_name), 0.0)
        _check_number(f"{name}.jumprelu_bandwidth", self.jumprelu_bandwidth, 0.0, inclusive=False)
        for field_name in ("l1_warm_up_steps", "l0_warm_up_steps", "divergence_patience"):
            _check_int(f"{name}.{field_name}", getattr(self, field_name), 0)
        # below 1 a sound run (whose reconstruction beats the mean's) could trip it
        _check_number(f"{name}.divergence_fvu", self.divergence_fvu, 1.0)

    def _check_target_l0(self, name: str) -> None:
        _check_number(f"{name}.target_l0_rate", self.target_l0_rate, 0.0, inclusive=False)
        if self.target_l0_rate > 1:
            raise ValueError(
                f"{name}.target_l0_rate must be in (0, 1] (the largest change of the "
                f"coefficient's logarithm in one step), got {self.target_l0_rate!r}."
            )
        if self.target_l0 is None:
            return
        if self.activation not in PENALISED_ACTIVATIONS:
            raise ValueError(
                f"{name}.target_l0 adapts the penalty coefficient of activation "
                f"{' / '.join(PENALISED_ACTIVATIONS)}; activation={self.activation!r} fixes its "
                f"L0 with k instead, so leave target_l0 unset (got {self.target_l0!r})."
            )
        _check_number(f"{name}.target_l0", self.target_l0, 0.0, inclusive=False)
        if self.target_l0 > self.d_sae:
            raise ValueError(
                f"{name}.target_l0 must be in (0, d_sae={self.d_sae}] (active latents per "
                f"token), got {self.target_l0!r}."
            )

    @property
    def sparse_training(self) -> bool:
        """Whether training steps take the sparse path (see ``training_path``)."""
        if self.training_path == "auto":
            return TRAINING_ACTIVATIONS[self.activation].k_sparse
        return self.training_path == "sparse"

    @property
    def inference_activation(self) -> str:
        """The activation the saved inference SAE uses."""
        return TRAINING_ACTIVATIONS[self.activation].saved_as

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return MatryoshkaSAEConfig

    @override
    def get_training_architecture_details(self) -> dict[str, Any]:
        # these are also inference fields, so SAELens would leave their training
        # values out of the saved metadata; record them explicitly
        return {
            **super().get_training_architecture_details(),
            "activation": self.activation,
            "k": self.k,
            "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm,
        }

    @override
    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        cfg_dict = super().get_inference_sae_cfg_dict()
        cfg_dict["activation"] = self.inference_activation
        cfg_dict["k"] = self.k if self.inference_activation == "topk" else None
        # the saved weights have the decoder norms folded into the encoder
        cfg_dict["rescale_acts_by_decoder_norm"] = False
        # Neuronpedia's id, empty until the SAE is hosted there (SAELens's Neuronpedia
        # helpers read metadata.neuronpedia_id; from_pretrained fills it for listed releases)
        cfg_dict["metadata"].setdefault("neuronpedia_id", None)
        return cfg_dict


@dataclass
class MatryoshkaSAEConfig(_MatryoshkaArchitecture, SAEConfig):
    """Inference configuration of a Matryoshka SAE (architecture ``"matryoshka"``).

    This is what ``cfg.json`` of a trained Matryoshka SAE holds. Unlike a flat
    SAELens save, it keeps the levels, so every prefix stays usable as an SAE.

    Args:
        matryoshka_widths: the prefix widths, strictly increasing and ending at
            ``d_sae``: the trained levels, or for sampled-prefix training the
            evaluation levels.
        activation: ``"jumprelu"`` (a latent fires above its ``threshold``; the
            saved form of batchtopk and jumprelu training), ``"topk"`` (each
            token's ``k`` largest) or ``"relu"``.
        k: active latents per token, for ``"topk"`` only.
        rescale_acts_by_decoder_norm: measure activations as if decoder rows had
            unit norm. Saved SAEs have the norms folded in and leave this False
            (a training checkpoint is folded as it is loaded, see ``loaders``).
    """

    matryoshka_widths: list[int] = field(default_factory=list)
    activation: Literal["jumprelu", "topk", "relu"] = "jumprelu"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_dimensions(self)
        _check_booleans(self)
        if self.activation not in INFERENCE_ACTIVATIONS and self.activation in TRAINING_ACTIVATIONS:
            raise ValueError(
                f"{name}.activation={self.activation!r} is a training activation (saved as "
                f"{TRAINING_ACTIVATIONS[self.activation].saved_as!r}): this is a training "
                "checkpoint's config. Load the checkpoint with SAE.load_from_disk, "
                "SAE.from_pretrained or load_sae, which read it as the SAE its run saves, or "
                "with MatryoshkaTrainingSAE.load_from_disk to resume."
            )
        _check_choice(f"{name}.activation", self.activation, INFERENCE_ACTIVATIONS)
        self.matryoshka_widths = validate_widths(
            self.matryoshka_widths,
            self.d_sae,
            f"{name}.matryoshka_widths",
            append_d_sae=False,
        )
        k = _check_k(f"{name}.k", self.k, self.activation, self.d_sae)
        self.k = None if k is None else int(k)
        super().__post_init__()
