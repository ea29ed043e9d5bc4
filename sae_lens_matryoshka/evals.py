"""Matryoshka evals: every level measured as an SAE of its own, and absorption against ground truth.

- ``evaluate_levels`` measures each level's truncated SAE with SAELens's
  ``run_evals`` metrics (reconstruction, sparsity, dead/dense latents, CE loss
  recovered, KL), every level on the same tokens in one pass over them, and
  adds each level's decoder geometry; ``plot_level_metrics`` draws the table.
- ``mean_max_decoder_cosine`` is SAEBench's ``average_max_decoder_cosine_sim``,
  computed in blocks of bounded memory (``level_max_decoder_cosines`` gives
  every level's at once).
- ``hierarchy_absorption`` and ``feature_recovery`` score an SAE against a
  synthetic hierarchy whose true features are known (see ``toy.ToyHierarchy``).
- SAEBench (``sae-bench``, imported only when one of these is called, since
  its pins conflict with this package's): ``saebench_core`` runs its core eval
  on your model and activation store, ``saebench_core_levels`` makes its
  per-level table in one call (``sae.truncate(width)`` per level, every level
  on the same tokens), and ``saebench_absorption`` runs its absorption eval
  (first-letter probing, the paper's metric) on a model object you already
  have.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.synthetic import mean_correlation_coefficient
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids

from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
from sae_lens_matryoshka.io.loaders import to_inference
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE

if TYPE_CHECKING:
    # in annotations only: TransformerLens 2 (SAEBench's and SAEDashboard's pin) has
    # no top-level ``HookedRootModule``, and TransformerLens 3 deprecates the other path
    from transformer_lens import HookedRootModule, HookedTransformer


@torch.no_grad()
def decoder_feature_cosines(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Cosine of every latent's decoder with every true feature direction: ``[d_sae, n_features]``."""
    W_dec = W_dec.detach().float()
    directions = directions.detach().float()
    return (W_dec / W_dec.norm(dim=-1, keepdim=True)) @ (
        directions / directions.norm(dim=-1, keepdim=True)
    ).T


#: elements of one block of the cosine matrix: bounded memory (256 MiB in float32)
_COSINE_BLOCK = 1 << 26


@torch.no_grad()
def level_max_decoder_cosines(W_dec: torch.Tensor, widths: Sequence[int]) -> list[float]:
    """:func:`mean_max_decoder_cosine` of every prefix ``W_dec[:width]``, in one pass.

    The ``d_sae x d_sae`` cosine matrix (17 GB at 65k latents) is never built:
    rows are taken a block at a time, each block's maximum is taken per latent
    group (between consecutive widths), and the running maximum over groups
    gives every prefix's nearest other latent. Memory is bounded by one block.
    """
    widths = list(widths)
    if widths[0] < 2:
        raise ValueError(
            f"a decoder cosine needs at least 2 latents; the first width is {widths[0]}."
        )
    d_sae = widths[-1]
    unit = W_dec[:d_sae].float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    bounds = list(zip([0, *widths[:-1]], widths, strict=True))
    rows_per_block = max(1, _COSINE_BLOCK // d_sae)
    totals = torch.zeros(len(widths), dtype=torch.float64)
    for start in range(0, d_sae, rows_per_block):
        rows = torch.arange(start, min(start + rows_per_block, d_sae), device=unit.device)
        cosines = unit[rows] @ unit.T
        cosines[torch.arange(len(rows)), rows] = -torch.inf  # not its own nearest
        per_group = torch.stack([cosines[:, a:b].max(dim=-1).values for a, b in bounds], dim=1)
        nearest = per_group.cummax(dim=1).values  # [rows, level]: nearest within each prefix
        group = torch.bucketize(rows, torch.tensor(widths, device=rows.device), right=True)
        inside = torch.arange(len(widths), device=rows.device) >= group[:, None]
        totals += torch.where(inside, nearest, 0.0).sum(dim=0).double().cpu()
    return [(total / width).item() for total, width in zip(totals, widths, strict=True)]


@torch.no_grad()
def mean_max_decoder_cosine(W_dec: torch.Tensor) -> float:
    """Mean over latents of the largest cosine between its decoder and any other latent's.

    SAEBench's ``average_max_decoder_cosine_sim``: high values mean redundant or
    split latents. Needs at least two latents; memory stays bounded (see
    :func:`level_max_decoder_cosines`).
    """
    if W_dec.shape[0] < 2:
        raise ValueError(f"mean_max_decoder_cosine needs at least 2 latents, got {W_dec.shape[0]}.")
    return level_max_decoder_cosines(W_dec, [W_dec.shape[0]])[0]


class HookSite:
    """Where the SAE reads the model: a whole hook, one head of it, or all heads flattened.

    Mirrors SAELens's evals: ``hook_head_index`` picks one head of an attention
    hook; other ``hook_q/k/v/z`` hooks are read with their heads flattened.
    """

    def __init__(self, hook_name: str, head_index: int | None) -> None:
        self.head_index = head_index
        self.flatten_heads = head_index is None and any(
            part in hook_name for part in ("hook_q", "hook_k", "hook_v", "hook_z")
        )

    def read(self, activations: torch.Tensor) -> torch.Tensor:
        if self.head_index is not None:
            return activations[:, :, self.head_index]
        return activations.flatten(-2, -1) if self.flatten_heads else activations

    def write(self, activations: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.head_index is not None:
            written = activations.clone()
            written[:, :, self.head_index] = new
            return written
        return new.reshape(activations.shape)

    def ablate(self, activations: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG002
        return self.write(activations, torch.zeros_like(self.read(activations)))

    def replace(
        self,
        activations: torch.Tensor,
        hook: Any,  # noqa: ARG002 (TransformerLens passes it)
        level: SAE[Any],
        scaler: ActivationScaler,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """The level's reconstruction in place of the activations, on the counted tokens."""
        x = self.read(activations)
        x_hat = scaler.unscale(level.decode(level.encode(scaler.scale(x.to(level.device)))))
        kept = torch.where(mask[..., None].to(x_hat.device), x_hat.to(x.dtype), x.to(x_hat.device))
        return self.write(activations, kept.to(activations.device))


def ignored_tokens(model: HookedRootModule, exclude: Iterable[int] | bool) -> list[int]:
    """The token ids whose positions are not counted (SAELens's ``exclude_special_tokens``)."""
    if exclude is True:
        return list(get_special_token_ids(model.tokenizer))
    return list(exclude) if exclude else []


def token_mask(tokens: torch.Tensor, ignore: list[int]) -> torch.Tensor:
    """Which positions count: those whose token is not ignored."""
    if not ignore:
        return torch.ones_like(tokens, dtype=torch.bool)
    return ~torch.isin(tokens, torch.tensor(ignore, device=tokens.device))


class _LevelTotals:
    """One level's running sums over the evaluated tokens, aggregated as SAELens's ``run_evals`` does."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.variance = ExplainedVarianceCalculator()
        self.squared_errors: list[torch.Tensor] = []
        self.l0: list[torch.Tensor] = []
        self.firing = torch.zeros(d_sae, device=device)
        self.ce_with_sae: list[torch.Tensor] = []
        self.kl_with_sae: list[torch.Tensor] = []

    def add_reconstruction(
        self, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """``x``, ``x_hat``, ``acts`` flattened to tokens; ``mask`` keeps the counted tokens."""
        x, x_hat, acts = x[mask], x_hat[mask], acts[mask]
        self.variance.add_batch(sae_output=x_hat, hidden_acts=x)
        self.squared_errors.append((x - x_hat).pow(2).sum(dim=-1))
        fired = (acts != 0).float()
        self.l0.append(fired.sum(dim=-1))
        self.firing += fired.sum(dim=0)

    def reconstruct(
        self,
        level: MatryoshkaSAE,
        x: torch.Tensor,
        x_scaled: torch.Tensor,
        mask: torch.Tensor,
        scaler: ActivationScaler,
    ) -> None:
        """Add ``level``'s reconstruction of ``x [batch, pos, d_in]`` (``x_scaled`` as it reads it)."""
        acts = level.encode(x_scaled)
        x_hat = scaler.unscale(level.decode(acts))
        self.add_reconstruction(
            x.flatten(0, 1), x_hat.flatten(0, 1), acts.flatten(0, 1), mask.flatten().to(x.device)
        )

    def row(self, n_tokens: int, dense_threshold: float) -> dict[str, float]:
        density = self.firing / n_tokens
        return {
            "explained_variance": self.variance.compute(),
            "mse": torch.cat(self.squared_errors).mean().item(),
            "l0": torch.cat(self.l0).mean().item(),
            "dead_latents": int((density == 0).sum()),
            "dense_latents": int((density > dense_threshold).sum()),
        }


def _kl_divergence(original: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-token ``KL(original || new)`` of two logit tensors (SAELens's definition)."""
    log_new = torch.nn.functional.log_softmax(new, dim=-1)
    probs = torch.nn.functional.softmax(original, dim=-1)
    return torch.nn.functional.kl_div(log_new, probs, reduction="none").sum(dim=-1)


def _score(with_ablation: float, with_sae: float, without_sae: float) -> float:
    """The fraction of the ablation's damage the SAE avoids (SAELens's CE / KL score)."""
    return (with_ablation - with_sae) / (with_ablation - without_sae)


@torch.no_grad()
def evaluate_levels(
    sae: MatryoshkaSAE | MatryoshkaTrainingSAE,
    model: HookedRootModule,
    activation_store: ActivationsStore,
    n_batches: int = 10,
    batch_size_prompts: int | None = None,
    compute_ce_loss: bool = True,
    dense_threshold: float = 0.1,
    exclude_special_tokens: Iterable[int] | bool = False,
    activation_scaler: ActivationScaler | None = None,
) -> list[dict[str, float]]:
    """SAELens's evals on every level of ``sae``, all on the same tokens: one row per level width.

    ``n_batches`` token batches are drawn once. For each, the model runs once
    clean (its activations at the hook, logits and loss) and once with the hook
    zero-ablated; every level (the standalone SAE ``sae.truncate(width)``)
    reconstructs the same activations, and for CE and KL runs the model once
    more with its reconstruction spliced in. So the rows differ only by level,
    never by batch, and each equals SAELens's ``run_evals`` on
    ``sae.truncate(width)`` over these tokens. ``dead_latents`` never fired on
    the evaluated tokens; ``dense_latents`` fired on more than
    ``dense_threshold`` of them; ``mean_max_decoder_cosine`` is the level's
    decoder geometry.
    """
    if isinstance(sae, MatryoshkaTrainingSAE):
        sae = to_inference(sae)
    scaler = activation_scaler or ActivationScaler()
    hook_name = sae.cfg.metadata.hook_name
    site = HookSite(hook_name, sae.cfg.metadata.hook_head_index)
    ignore = ignored_tokens(model, exclude_special_tokens)
    levels = [sae.truncate(width) for width in sae.matryoshka_widths]
    for level in levels:  # the site reads heads flattened already, as SAELens's evals do
        level.turn_off_forward_pass_hook_z_reshaping()
    totals = [_LevelTotals(level.cfg.d_sae, sae.device) for level in levels]
    ce_without, ce_ablation, kl_ablation = [], [], []
    n_tokens = 0
    batch_size = batch_size_prompts or activation_store.store_batch_size_prompts
    for _ in range(n_batches):
        tokens = activation_store.get_batch_tokens(batch_size)
        mask = token_mask(tokens, ignore)
        n_tokens += int(mask.sum())
        (logits, loss), cache = model.run_with_cache(
            tokens, return_type="both", loss_per_token=True, names_filter=[hook_name]
        )
        x = site.read(cache[hook_name]).to(sae.device)
        x_scaled = scaler.scale(x)
        ce_without.append(loss[mask[:, :-1]])
        if compute_ce_loss:
            ablated_logits, ablated_loss = model.run_with_hooks(
                tokens,
                return_type="both",
                loss_per_token=True,
                fwd_hooks=[(hook_name, site.ablate)],
            )
            ce_ablation.append(ablated_loss[mask[:, :-1]])
            kl_ablation.append(_kl_divergence(logits, ablated_logits)[mask])
        for level, level_totals in zip(levels, totals, strict=True):
            level_totals.reconstruct(level, x, x_scaled, mask, scaler)
            if compute_ce_loss:
                replace = partial(site.replace, level=level, scaler=scaler, mask=mask)
                new_logits, new_loss = model.run_with_hooks(
                    tokens,
                    return_type="both",
                    loss_per_token=True,
                    fwd_hooks=[(hook_name, replace)],
                )
                level_totals.ce_with_sae.append(new_loss[mask[:, :-1]])
                level_totals.kl_with_sae.append(_kl_divergence(logits, new_logits)[mask])
    rows = _level_rows(sae, totals, n_tokens, dense_threshold)
    for row, level_totals in zip(rows, totals, strict=True):
        if compute_ce_loss:
            without = torch.cat(ce_without).mean().item()
            with_sae = torch.cat(level_totals.ce_with_sae).mean().item()
            ablation = torch.cat(ce_ablation).mean().item()
            kl_sae = torch.cat(level_totals.kl_with_sae).mean().item()
            kl_ablated = torch.cat(kl_ablation).mean().item()
            row |= {
                "ce_loss_score": _score(ablation, with_sae, without),
                "ce_loss_with_sae": with_sae,
                "ce_loss_without_sae": without,
                "ce_loss_with_ablation": ablation,
                "kl_div_score": (kl_ablated - kl_sae) / kl_ablated,
                "kl_div_with_sae": kl_sae,
            }
    return rows


@torch.no_grad()
def evaluate_levels_on_activations(
    sae: MatryoshkaSAE | MatryoshkaTrainingSAE,
    batches: Iterable[torch.Tensor],
    dense_threshold: float = 0.1,
) -> list[dict[str, float]]:
    """``evaluate_levels``'s reconstruction rows from activation batches alone, without a model.

    For what has activations and no model to run: a run trained from cached
    activations, whose model is never loaded. Every level reconstructs the
    same batches (``[..., d_in]``, as the SAE reads them); the rows hold the
    explained variance, MSE, L0, dead and dense latents and decoder geometry
    that ``evaluate_levels`` computes the same way, and no CE or KL loss.
    """
    if isinstance(sae, MatryoshkaTrainingSAE):
        sae = to_inference(sae)
    scaler = ActivationScaler()
    levels = [sae.truncate(width) for width in sae.matryoshka_widths]
    totals = [_LevelTotals(level.cfg.d_sae, sae.device) for level in levels]
    n_tokens = 0
    for batch in batches:
        x = batch.to(sae.device).reshape(-1, 1, batch.shape[-1])  # tokens as [n, 1, d_in]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        n_tokens += x.shape[0]
        for level, level_totals in zip(levels, totals, strict=True):
            level_totals.reconstruct(level, x, x, mask, scaler)
    if n_tokens == 0:
        raise ValueError("evaluate_levels_on_activations needs at least one activation batch.")
    return _level_rows(sae, totals, n_tokens, dense_threshold)


def _level_rows(
    sae: MatryoshkaSAE, totals: Sequence[_LevelTotals], n_tokens: int, dense_threshold: float
) -> list[dict[str, float]]:
    """One row per level: its width, reconstruction totals and decoder geometry."""
    cosines = (
        level_max_decoder_cosines(sae.W_dec, sae.matryoshka_widths)
        if sae.matryoshka_widths[0] > 1
        else None
    )
    rows = []
    for index, (width, level_totals) in enumerate(zip(sae.matryoshka_widths, totals, strict=True)):
        row: dict[str, float] = {"width": width, **level_totals.row(n_tokens, dense_threshold)}
        if cosines is not None:
            row["mean_max_decoder_cosine"] = cosines[index]
        rows.append(row)
    return rows


class LevelEvaluator:
    """A ``LanguageModelSAETrainingRunner`` evaluator that adds every level's metrics.

    Wraps the runner's own evaluator: its metrics are kept, and each level's
    row of ``evaluate_levels`` is added as ``levels/<width>/<metric>``, so the
    runner's eval steps log them to wandb. Install with ``add_level_evals(runner)``.
    """

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(
        self, sae: Any, data_provider: Any, activation_scaler: ActivationScaler
    ) -> dict[str, Any]:
        metrics = self.base(sae, data_provider, activation_scaler)
        store = self.base.activations_store
        special = store.exclude_special_tokens
        # the prefetcher shares the store's generator; pause it as the base evaluator does
        pause = (
            data_provider.paused() if hasattr(data_provider, "paused") else contextlib.nullcontext()
        )
        with pause:
            rows = evaluate_levels(
                sae,
                self.base.model,
                store,
                n_batches=self.base.n_eval_batches,
                batch_size_prompts=self.base.eval_batch_size_prompts,
                exclude_special_tokens=special.tolist() if special is not None else False,
                activation_scaler=activation_scaler,
            )
        for row in rows:
            for name, value in row.items():
                if name != "width":
                    metrics[f"levels/{row['width']}/{name}"] = value
        return metrics


def add_level_evals(runner: Any) -> None:
    """Make ``runner``'s periodic evals also evaluate every Matryoshka level."""
    runner.evaluator = LevelEvaluator(runner.evaluator)


def plot_level_metrics(
    rows: Sequence[Mapping[str, float]],
    path: str | Path,
    metrics: Sequence[str] = ("explained_variance", "l0", "ce_loss_score", "dead_latents"),
    title: str = "Matryoshka levels",
) -> Path:
    """Each metric against the level width (log scale), one panel per metric, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in row for row in rows)]
    if not metrics:
        raise ValueError("None of the requested metrics are in the rows.")
    widths = [row["width"] for row in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.plot(widths, [row.get(metric, float("nan")) for row in rows], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("level width (latents)")
        axis.set_title(metric.replace("_", " "))
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def hierarchy_absorption(
    sae: SAE[Any],
    features: torch.Tensor,
    activations: torch.Tensor,
    directions: torch.Tensor,
    children: Mapping[int, Sequence[int]],
    among: int | None = None,
) -> dict[str, Any]:
    """Absorption per parent-child edge of a synthetic hierarchy, and a summary score.

    For each parent ``p`` its latent is the one (among the first ``among``,
    default all) whose decoder has the largest cosine with ``directions[p]``.
    Over the samples where ``p`` fires:

    - ``recall_without_children``: fraction where the latent fires when no child of ``p`` does;
    - ``recall_with_child`` (per child ``c``): fraction where it fires when ``c`` does;
    - ``gap = recall_without_children - recall_with_child`` (signed; positive
      means the child took the parent's latent over).

    ``absorption`` is the mean over edges of ``max(gap, 0)``: 0 when the parent's
    latent fires regardless of its children, 1 when it always falls silent
    exactly when a child fires. Latent activations are ``sae.encode`` in eval mode.
    """
    was_training = sae.training
    sae.eval()
    acts = sae.encode(activations)
    sae.train(was_training)
    cosines = decoder_feature_cosines(sae.W_dec, directions)
    edges = []
    for parent, kids in children.items():
        latent = int(cosines[:among, parent].argmax())
        fired = acts[:, latent] > 0
        parent_on = features[:, parent] > 0
        no_child = parent_on & (features[:, list(kids)] <= 0).all(dim=-1)
        without = fired[no_child].float().mean().item()
        for child in kids:
            with_child = fired[parent_on & (features[:, child] > 0)].float().mean().item()
            edges.append(
                {
                    "parent": parent,
                    "child": child,
                    "latent": latent,
                    "recall_without_children": without,
                    "recall_with_child": with_child,
                    "gap": without - with_child,
                }
            )
    score = sum(max(edge["gap"], 0.0) for edge in edges) / len(edges) if edges else 0.0
    return {"absorption": score, "edges": edges}


@torch.no_grad()
def feature_recovery(sae: SAE[Any], directions: torch.Tensor) -> dict[str, Any]:
    """How well the decoder recovers the true feature directions.

    ``best_cosine[i]`` is the largest cosine between true feature ``i`` and any
    latent's decoder; ``mcc`` is SAELens's mean correlation coefficient (the
    mean |cosine| of an optimal one-to-one matching).
    """
    cosines = decoder_feature_cosines(sae.W_dec, directions)
    best = cosines.max(dim=0).values
    return {
        "best_cosine": best.tolist(),
        "mean_best_cosine": best.mean().item(),
        "mcc": mean_correlation_coefficient(sae.W_dec.detach().float(), directions.float()),
    }


# --- SAEBench --------------------------------------------------------------------------
#
# SAEBench pins transformer-lens<3, transformers<4.57, datasets<4 and numpy<2, which this
# package's own environment does not meet, so it is no dependency: the functions below
# import it when called, and say what to install when it is missing.

_SAEBENCH_HINT = (
    "install it with `pip install sae-bench` (it pins transformer-lens<3, transformers<4.57, "
    "datasets<4 and numpy<2, so give it an environment of its own, as `make test-clients` "
    "does; see the README's 'Inspect and evaluate')"
)


def _saebench(module: str) -> Any:
    """``sae_bench.<module>``, imported on first use."""
    try:
        return importlib.import_module(f"sae_bench.{module}")
    except ImportError as error:
        raise ImportError(
            f"This needs SAEBench (importing sae_bench.{module} failed: {error}); {_SAEBENCH_HINT}."
        ) from error


def saebench_formatted(sae: SAE[Any]) -> SAE[Any]:
    """``sae`` as SAEBench's evals read it, ``sae`` itself left unchanged.

    SAEBench's own route for an SAE object, ``load_and_format_sae("custom",
    sae, device)``, copies SAELens 6's ``cfg.metadata`` fields (hook name and
    layer, model name, context size, ...) onto ``cfg`` and adds some to the
    metadata, where its evals read them. Done here on a copy that shares the
    weights but has its own config, so what the caller's SAE saves stays as it
    was.
    """
    general_utils = _saebench("sae_bench_utils.general_utils")
    view = copy.copy(sae)
    view.cfg = copy.deepcopy(sae.cfg)
    formatted = general_utils.load_and_format_sae("custom", view, str(sae.device))
    return formatted[1]


def saebench_core_config(
    sae: SAE[Any], activation_store: ActivationsStore, n_batches: int = 10, **overrides: Any
) -> Any:
    """SAEBench's ``CoreEvalConfig`` with every metric on, sized to ``activation_store``.

    ``n_batches`` batches of the store's ``store_batch_size_prompts`` prompts
    for each of SAEBench's two passes (CE/KL, then reconstruction, sparsity and
    per-latent statistics); ``overrides`` are more ``CoreEvalConfig`` fields.
    """
    eval_config = _saebench("evals.core.eval_config")
    settings: dict[str, Any] = {
        "model_name": sae.cfg.metadata.model_name or "",
        "batch_size_prompts": activation_store.store_batch_size_prompts,
        "n_eval_reconstruction_batches": n_batches,
        "n_eval_sparsity_variance_batches": n_batches,
        "context_size": activation_store.context_size,
        "compute_kl": True,
        "compute_ce_loss": True,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
    }
    return eval_config.CoreEvalConfig(**(settings | overrides))


#: the per-latent statistics SAEBench's ``calculate_misc_metrics`` summarises
_MISC_INPUTS = ("feature_density", "max_encoder_cosine_sim", "max_decoder_cosine_sim")


def saebench_core(
    sae: SAE[Any],
    model: HookedRootModule,
    activation_store: ActivationsStore,
    eval_config: Any = None,
    ignore_tokens: Iterable[int] = (),
) -> dict[str, float]:
    """SAEBench's core eval of ``sae`` on your ``model`` and ``activation_store``, as one flat row.

    Runs ``sae_bench.evals.core.main.run_evals`` on ``saebench_formatted(sae)``
    with ``eval_config`` (default: :func:`saebench_core_config`). The row holds
    every scalar metric it reports, under SAEBench's names (``explained_variance``,
    ``mse``, ``cossim``, ``l0``, ``l1``, ``ce_loss_score``, ``kl_div_score``, ...;
    its metric groups are flattened, the names are unique), and, when the
    per-latent statistics were computed, SAEBench's summaries of them
    (``frac_alive``, ``average_max_decoder_cosine_sim``, ...). Values are as
    SAEBench computes them, definitions included: its ``mse`` is each token's
    squared error summed over ``d_in`` divided by the number of tokens in its
    batch; its ``explained_variance`` is its own formula, not SAELens's.

    ``ignore_tokens``: token ids SAEBench leaves out (its own runs pass the
    tokenizer's pad, eos and bos ids).
    """
    core = _saebench("evals.core.main")
    config = eval_config if eval_config is not None else saebench_core_config(sae, activation_store)
    metrics, feature_metrics = core.run_evals(
        saebench_formatted(sae), activation_store, model, config, ignore_tokens=set(ignore_tokens)
    )
    row: dict[str, float] = {}
    for group in metrics.values():
        for name, value in group.items():
            if name in row:
                raise RuntimeError(f"SAEBench reports {name!r} in two metric groups.")
            row[name] = float(value)
    if all(name in feature_metrics for name in _MISC_INPUTS):
        row |= {name: float(v) for name, v in core.calculate_misc_metrics(feature_metrics).items()}
    return row


class _SameTokens:
    """An activation store that serves each later level the token batches the first level drew.

    SAEBench's core eval draws its batches from the store as it goes (and
    calls ``reset_input_dataset`` between its two passes, which in SAELens
    6.54 does not rewind what ``get_batch_tokens`` reads). Recording the first
    level's draws and replaying them makes every level's row measure the same
    tokens, which are those a fresh store would give SAEBench for any one
    level. Anything else is read from the wrapped store.
    """

    def __init__(self, store: ActivationsStore) -> None:
        self.store = store
        self.batches: list[torch.Tensor] = []
        self.position: int | None = None  # None while recording

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def get_batch_tokens(self, batch_size: int | None = None, **kwargs: Any) -> torch.Tensor:
        if self.position is None:
            tokens = self.store.get_batch_tokens(batch_size, **kwargs)
            self.batches.append(tokens)
            return tokens
        if self.position >= len(self.batches):
            raise RuntimeError(
                "A later level asked SAEBench's store for more token batches than the first "
                "level did; every level must be evaluated with the same eval_config."
            )
        tokens = self.batches[self.position]
        self.position += 1
        return tokens

    def reset_input_dataset(self) -> None:
        if self.position is None:  # replays repeat whatever the reset did the first time
            self.store.reset_input_dataset()

    def replay(self) -> None:
        """Serve the recorded batches again, from the first."""
        self.position = 0


def saebench_core_levels(
    sae: MatryoshkaSAE | MatryoshkaTrainingSAE,
    model: HookedRootModule,
    activation_store: ActivationsStore,
    eval_config: Any = None,
    ignore_tokens: Iterable[int] = (),
    widths: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """SAEBench's core metrics of every level of ``sae``: one row per level width, in one call.

    Each row is :func:`saebench_core` of the standalone SAE
    ``sae.truncate(width)`` (``width`` first), for each level width (or each
    of ``widths``). Every level reads the same token batches: those the first
    level drew from ``activation_store`` (see :class:`_SameTokens`), so a row
    equals SAEBench's core eval of that level's truncated SAE on a fresh store
    like ``activation_store``, and rows differ only by level. The rows suit
    :func:`plot_level_metrics` and the model card of ``io.hub``.
    """
    _saebench("evals.core.main")  # fail before any work when SAEBench is missing
    if isinstance(sae, MatryoshkaTrainingSAE):
        sae = to_inference(sae)
    config = eval_config if eval_config is not None else saebench_core_config(sae, activation_store)
    tokens = _SameTokens(activation_store)
    rows = []
    for width in widths if widths is not None else sae.matryoshka_widths:
        level = sae.truncate(width)
        rows.append({"width": width, **saebench_core(level, model, tokens, config, ignore_tokens)})
        tokens.replay()
    return rows


def _seed_everything(seed: int) -> None:
    """Seed the generators SAEBench's absorption eval draws from (prompts, splits, probes)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def saebench_absorption(
    sae: SAE[Any],
    model: HookedTransformer,
    eval_config: Any = None,
    artifacts_dir: str | Path = "artifacts/absorption",
    sae_name: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """SAEBench's absorption eval (first-letter spelling) of ``sae``, on a model object you have.

    The metric of the paper: SAEBench trains a linear probe for each word's
    first letter on ``model``'s residual stream at the SAE's layer, finds the
    latents that k-sparse probes pick for each letter, and counts the words
    whose letter the probe sees but those latents miss, with other latents
    aligned with the probe firing instead. SAEBench's ``run_eval`` does this
    for a model it loads by name from the Hub; this runs the same two
    experiments (``run_k_sparse_probing_experiment``, then
    ``run_feature_absortion_experiment``) and the same aggregation on
    ``model`` as given, so a local or offline model works too.

    Preconditions, checked here (SAEBench would otherwise probe another hook
    than the SAE reads): the SAE reads ``blocks.<layer>.hook_resid_post``, and
    ``model`` has a tokenizer whose words are single tokens in the prompt
    template. It needs a model that represents first letters (SAEBench
    recommends models of 2B parameters or more): when fewer than
    ``min_feats_for_eval`` letters' probes reach F1 ``min_GT_probe_f1``, a
    ``ValueError`` says so (SAEBench's ``run_eval`` prints it and stops).

    Args:
        sae: the SAE, e.g. a ``MatryoshkaSAE`` or one level, ``sae.truncate(width)``.
        model: the model the SAE reads, with its tokenizer.
        eval_config: SAEBench's ``AbsorptionEvalConfig`` (default: its defaults,
            ``model_name`` and ``llm_dtype`` from ``model``). Its ``random_seed``
            seeds Python's, NumPy's and torch's global generators, which the
            prompts, splits and probes draw from (``run_eval`` seeds nothing);
            the SAE is evaluated in ``llm_dtype`` (a copy, as ``run_eval``
            casts it).
        artifacts_dir: where the probes (one per model name and layer, reused
            by later calls) and the per-SAE tables are written, instead of
            SAEBench's package folder.
        sae_name: the name the tables are written under; recomputed every call.
        device: where SAEBench computes; by default the SAE's device.

    Returns:
        SAEBench's mean metrics (``mean_absorption_fraction_score``,
        ``mean_full_absorption_score``, ``mean_num_split_features`` and their
        ``std_dev_*``), and ``letters``: one dict per letter evaluated.
    """
    main = _saebench("evals.absorption.main")
    if eval_config is None:
        eval_config = _saebench("evals.absorption.eval_config").AbsorptionEvalConfig(
            model_name=model.cfg.model_name,
            llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
        )
    formatted = saebench_formatted(sae)
    layer = formatted.cfg.hook_layer
    probed = f"blocks.{layer}.hook_resid_post"
    if formatted.cfg.hook_name != probed:
        raise ValueError(
            f"SAEBench's absorption eval probes {probed}, but this SAE reads "
            f"{formatted.cfg.hook_name}: it needs an SAE on the residual stream after a block."
        )
    device = device or str(sae.device)
    dtype = _saebench("sae_bench_utils.general_utils").str_to_dtype(eval_config.llm_dtype)
    if formatted.dtype != dtype or formatted.device != torch.device(device):
        # run_eval moves the SAE to the model's dtype (its probe projections need it);
        # a copy, since the formatted view shares its parameters with ``sae``
        formatted = copy.deepcopy(formatted).to(device=device, dtype=dtype)
    name = sae_name or f"{model.cfg.model_name}_{formatted.cfg.hook_name}_{formatted.cfg.d_sae}"
    artifacts = Path(artifacts_dir)
    sparse_dir, absorption_dir, probes_dir = (
        artifacts / "k_sparse_probing",
        artifacts / "feature_absorption",
        artifacts / "probes",
    )
    # what both experiments must see alike: the second reads the first's probes and results
    shared: dict[str, Any] = {
        "model": model,
        "sae": formatted,
        "layer": layer,
        "sae_name": name,
        "force": True,
        "max_k_value": eval_config.max_k_value,
        "prompt_template": eval_config.prompt_template,
        "prompt_token_pos": eval_config.prompt_token_pos,
        "device": device,
        "probes_dir": probes_dir,
    }
    _seed_everything(eval_config.random_seed)
    with torch.enable_grad():  # the probes train; SAEBench's run_eval enables it globally
        probing = main.run_k_sparse_probing_experiment(
            **shared,
            f1_jump_threshold=eval_config.f1_jump_threshold,
            k_sparse_probe_l1_decay=eval_config.k_sparse_probe_l1_decay,
            k_sparse_probe_batch_size=eval_config.k_sparse_probe_batch_size,
            k_sparse_probe_num_epochs=eval_config.k_sparse_probe_num_epochs,
            eval_batch_size=eval_config.eval_k_sparse_probe_batch_size,
            precalc_k_sparse_probe_sae_acts=eval_config.precalc_k_sparse_probe_sae_acts,
            experiment_dir=sparse_dir,
        )
        represented = int((probing["f1_probe"] > eval_config.min_GT_probe_f1).sum())
        if represented < eval_config.min_feats_for_eval:
            raise ValueError(
                f"Only {represented} first letters have a probe with F1 above "
                f"{eval_config.min_GT_probe_f1} on {model.cfg.model_name} at layer {layer}, "
                f"fewer than min_feats_for_eval={eval_config.min_feats_for_eval}: the model "
                "does not represent first letters there well enough for this eval."
            )
        raw = main.run_feature_absortion_experiment(
            **shared,
            feature_split_f1_jump_threshold=eval_config.f1_jump_threshold,
            batch_size=eval_config.llm_batch_size,
            experiment_dir=absorption_dir,
            sparse_probing_experiment_dir=sparse_dir,
        )
    letters = []
    for _, row in main._aggregate_results_df(raw).iterrows():
        f1 = probing[probing["letter"] == row["letter"]]["f1_probe"].item()
        if f1 > eval_config.min_GT_probe_f1:  # as SAEBench's run_eval selects letters
            letters.append(
                {
                    "first_letter": row["letter"],
                    "mean_absorption_fraction": float(row["mean_absorption_fraction"]),
                    "full_absorption_rate": float(row["full_absorption_rate"]),
                    "num_full_absorption": int(row["num_full_absorption"]),
                    "num_probe_true_positives": float(row["num_probe_true_positives"]),
                    "num_split_features": int(row["num_split_feats"]),
                }
            )
    result: dict[str, Any] = {}
    for metric, field in (
        ("absorption_fraction_score", "mean_absorption_fraction"),
        ("full_absorption_score", "full_absorption_rate"),
        ("num_split_features", "num_split_features"),
    ):
        values = [letter[field] for letter in letters]
        result[f"mean_{metric}"] = statistics.mean(values)
        result[f"std_dev_{metric}"] = statistics.stdev(values) if len(values) > 1 else 0.0
    result["letters"] = letters
    return result
