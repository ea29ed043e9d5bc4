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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.synthetic import mean_correlation_coefficient
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedRootModule

from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
from sae_lens_matryoshka.io.loaders import to_inference
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE


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
            acts = level.encode(x_scaled)
            x_hat = scaler.unscale(level.decode(acts))
            level_totals.add_reconstruction(
                x.flatten(0, 1),
                x_hat.flatten(0, 1),
                acts.flatten(0, 1),
                mask.flatten().to(x.device),
            )
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
    cosines = (
        level_max_decoder_cosines(sae.W_dec, sae.matryoshka_widths)
        if sae.matryoshka_widths[0] > 1
        else None
    )
    rows = []
    for index, (width, level_totals) in enumerate(zip(sae.matryoshka_widths, totals, strict=True)):
        row: dict[str, float] = {"width": width, **level_totals.row(n_tokens, dense_threshold)}
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
