"""SAEDashboard on Matryoshka SAEs: its architecture check, and one dashboard page per level.

SAEDashboard (``sae-dashboard``) computes the activations of the features it
renders by slicing the SAE's weights down to those features
(``FeatureMaskingContext``). Which tensors it slices it decides from the SAE's
architecture name, from a fixed list (standard, jumprelu, gated, transcoders);
any other name is refused with ``ValueError: Invalid architecture``. A
``MatryoshkaSAE`` has the attributes of the SAELens class that computes the
same activation (``MatryoshkaSAE.saelens_architecture``: ``threshold`` for
jumprelu, nothing more for standard), so the adapter ``install`` puts in place
lets SAEDashboard's own code slice it under that name: whatever SAEDashboard
does for ``"jumprelu"``, in this version or a later one, it then does for a
JumpReLU-inferring Matryoshka SAE, and the list needs no entry of ours.
A topk-inferring SAE never reaches the check (its activation is a SAELens
``TopK``, which SAEDashboard encodes whole, since slicing latents away would
change which k are selected), but SAEDashboard first folds the decoder norms
into the encoder, which would change that selection too, and a topk
``MatryoshkaSAE`` refuses; render ``to_portable(sae)`` instead.

The plugin installs the adapter on import when ``sae_dashboard`` is
installed (``registration``); this module itself imports ``sae_dashboard``
only inside its functions, so the plugin does not need it.

``save_level_dashboards`` writes SAEDashboard's feature-centric page once per
Matryoshka level, each holding the latents that level adds, in index order:
the general features of the first level first.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_matryoshka.inference_sae import MatryoshkaSAE

if TYPE_CHECKING:
    import torch
    from sae_dashboard.sae_vis_data import SaeVisData
    from sae_lens import HookedSAETransformer


def dashboard_installed() -> bool:
    """Whether ``sae_dashboard`` can be imported here (without importing it)."""
    return importlib.util.find_spec("sae_dashboard") is not None


@contextlib.contextmanager
def as_saelens_architecture(sae: MatryoshkaSAE) -> Iterator[None]:
    """Within the block, ``sae.cfg.architecture()`` names the SAELens class ``sae`` computes as.

    Only the config object of ``sae`` is affected, and only until the block ends:
    saving, loading and SAELens's registry keep seeing ``"matryoshka"``.
    """
    name = sae.saelens_architecture
    # the instance attribute shadows the classmethod
    sae.cfg.architecture = lambda: name
    try:
        yield
    finally:
        del sae.cfg.architecture


def install() -> None:
    """Let SAEDashboard's ``FeatureMaskingContext`` slice a ``MatryoshkaSAE``. Idempotent.

    Other SAEs go through SAEDashboard's code untouched.
    """
    from sae_dashboard.feature_data_generator import FeatureMaskingContext

    if getattr(FeatureMaskingContext, "_matryoshka_adapter", False):
        return
    enter = FeatureMaskingContext.__enter__

    @functools.wraps(enter)
    def __enter__(self: FeatureMaskingContext) -> FeatureMaskingContext:
        if not isinstance(self.sae, MatryoshkaSAE):
            return enter(self)
        with as_saelens_architecture(self.sae):
            return enter(self)

    FeatureMaskingContext.__enter__ = __enter__
    FeatureMaskingContext._matryoshka_adapter = True


@dataclass
class LevelDashboards:
    """What ``save_level_dashboards`` rendered.

    Attributes:
        data: SAEDashboard's data for every rendered latent (``feature_stats.max``
            and friends, in the order of the concatenated ``features``).
        pages: one HTML file per level, in level order.
        features: the latents on each page, in the order shown.
    """

    data: SaeVisData
    pages: list[Path]
    features: list[list[int]]


def level_features(sae: MatryoshkaSAE, per_level: int | None = None) -> list[list[int]]:
    """The latents each level adds (level ``l``: ``widths[l-1] <= i < widths[l]``), at most ``per_level`` each."""
    if per_level is not None and (isinstance(per_level, bool) or per_level < 1):
        raise ValueError(f"per_level must be a positive integer or None, got {per_level!r}.")
    starts = [0, *sae.matryoshka_widths[:-1]]
    return [
        list(range(start, end))[:per_level]
        for start, end in zip(starts, sae.matryoshka_widths, strict=True)
    ]


def save_level_dashboards(
    sae: MatryoshkaSAE,
    model: HookedSAETransformer,
    tokens: torch.Tensor,
    output_dir: str | Path,
    *,
    per_level: int | None = None,
    hook_point: str | None = None,
    **vis_config: Any,
) -> LevelDashboards:
    """Write SAEDashboard's feature-centric page for each level of ``sae`` into ``output_dir``.

    Page ``level_<l>_latents_<start>-<end>.html`` shows the latents level ``l``
    adds (``level_features``), the first ``per_level`` of them if given. One
    SAEDashboard run covers every page, so the model reads ``tokens`` once per
    batch of features, not once per level. ``sae`` is not changed: SAEDashboard
    folds the decoder norms into the SAE it is given, so it gets a copy, and
    its activations are those of ``sae`` with norms folded (the same when the
    decoder rows have unit norm, as trained Matryoshka SAEs' do).

    Args:
        sae: the SAE to render.
        model: the model it reads (SAEDashboard needs its tokenizer to write pages).
        tokens: ``[n_sequences, context]`` token ids to find top activations in.
        output_dir: where the pages go (created if missing).
        per_level: how many latents of each level to render; all if None.
        hook_point: the model hook the SAE reads; by default the one it was trained on.
        **vis_config: more ``SaeVisConfig`` fields (``minibatch_size_tokens``, ``device``, ...).
    """
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    hook_point = hook_point or sae.cfg.metadata.hook_name
    if not hook_point:
        raise ValueError(
            "hook_point is needed: this SAE's metadata has no hook_name (it was not "
            "trained by SAELens's runner); pass the model hook it reads."
        )
    features = level_features(sae, per_level)
    install()
    config = SaeVisConfig(
        hook_point=hook_point, features=[i for level in features for i in level], **vis_config
    )
    data = SaeVisRunner(config).run(encoder=copy.deepcopy(sae), model=model, tokens=tokens)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    pages = []
    for level, latents in enumerate(features):
        page = output / f"level_{level}_latents_{latents[0]}-{latents[-1]}.html"
        # SAEDashboard opens a page on the first feature it computed unless told
        # otherwise: a later level's page would open on a latent it does not hold, blank
        save_feature_centric_vis(data, page, feature_idx=latents[0], include_only=latents)
        pages.append(page)
    return LevelDashboards(data=data, pages=pages, features=features)
