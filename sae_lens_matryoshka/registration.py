"""Registering ``"matryoshka"`` with SAELens, and every SAELens routine the plugin wraps.

SAELens looks architectures up by name when it builds an SAE from a runner
config, a ``cfg.json`` or the command line. Registration happens on
``import sae_lens_matryoshka`` and must be idempotent: a second import, an
``importlib.reload`` or a notebook re-running cells must not fail.

Besides its two registry entries, the plugin wraps these SAELens routines
(each wrapper calls SAELens's own code, and acts on Matryoshka SAEs only):

- ``SAETrainer.save_checkpoint`` (``checkpoints``): a checkpoint is written
  aside, marked complete and renamed into place, so a killed run never
  leaves a torn one.
- ``SAETrainer.load_trainer_state`` (``checkpoints``): resuming refuses an
  incomplete checkpoint.
- ``SAE.load_from_disk`` (``loaders``): the plugin's file checks on every
  Matryoshka folder, and a checkpoint read as the SAE its run saves.
- ``NAMED_PRETRAINED_SAE_LOADERS["sae_lens"]`` (``loaders``):
  ``SAE.from_pretrained`` reads a checkpoint on the Hub the same way; and
  beneath that wrapper (``hub_misses``), a file neither cached nor
  downloadable (``HF_HUB_OFFLINE=1``, no network) fails naming its repo, the
  file and the download that brings it, for any architecture (which one is
  unknown until ``cfg.json`` is read).
- ``LanguageModelSAETrainingRunner.__init__`` and ``save_final_sae``
  (``save_paths``): the output and checkpoint paths are checked before the
  model loads, and a trained SAE whose final save fails is kept elsewhere;
  and ``LanguageModelSAETrainingRunner.__init__`` once more (``run_checks``):
  once the model is loaded, its hook exists and gives ``d_in`` values per token.
- ``SAETrainer.fit`` and ``_update_pbar`` (``progress``): a Matryoshka run's
  progress bar counts steps, shows the overall loss and ends at 100%.
- ``SAETrainer._train_step`` (``kept_outputs``): the step output the trainer
  holds through the next step keeps no ``n_tokens x d_sae`` tensor it will
  not read; and once more (``latent_order``): with ``order_latents_every``,
  the latents are ordered by firing frequency every that many steps and
  after the last, with their optimizer state and the trainer's statistics.
- ``LanguageModelSAETrainingRunner.__init__`` and ``run`` (``seeding``): torch's
  global generator is seeded from ``cfg.seed`` before the SAE is built and
  again before training, so the same config and seed train the same weights.
- ``LanguageModelSAETrainingRunner.run``, ``SAETrainer._is_logging_step``,
  ``_train_step`` and ``build_train_step_log_dict`` (``run_record``): every
  run leaves ``training_log.jsonl`` and ``loss_curve.png`` beside its output
  without wandb, and prints each level's explained variance, L0 and dead latents.
- ``LanguageModelSAETrainingRunner.__init__`` and ``run`` once more (``quiet``,
  the outermost): SAELens's, torch's and TransformerLens's known noise is
  dropped inside a Matryoshka run, each message matched by its source and
  text, and SAELens's warning that counts dataset rows against training tokens
  is replaced by one in tokens.
- SAEDashboard's ``FeatureMaskingContext.__enter__`` (``dashboard``), when
  ``sae_dashboard`` is installed: its architecture check accepts Matryoshka SAEs.
"""

from __future__ import annotations

from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_matryoshka import (
    dashboard,
    kept_outputs,
    latent_order,
    progress,
    quiet,
    run_checks,
    run_record,
    seeding,
)
from sae_lens_matryoshka.config import (
    ARCHITECTURE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
from sae_lens_matryoshka.io import checkpoints, hub_misses, loaders, save_paths
from sae_lens_matryoshka.training_sae import MatryoshkaTrainingSAE


def _same_class(registered: type, ours: type) -> bool:
    # A reloaded module defines new class objects with the same qualified name;
    # those replace the old entry rather than counting as a conflict.
    return (registered.__module__, registered.__qualname__) == (
        ours.__module__,
        ours.__qualname__,
    )


def _register(registry: dict[str, tuple[Any, Any]], entry: tuple[type, type]) -> None:
    existing = registry.get(ARCHITECTURE)
    if existing is not None and not all(
        _same_class(old, new) for old, new in zip(existing, entry, strict=True)
    ):
        raise RuntimeError(
            f"SAELens architecture {ARCHITECTURE!r} is already registered to "
            f"{existing[0].__module__}.{existing[0].__qualname__}; "
            "sae_lens_matryoshka cannot register its own classes under that name."
        )
    registry[ARCHITECTURE] = entry


def register() -> None:
    """Register the Matryoshka training and inference classes with SAELens.

    Also makes SAELens's trainer write Matryoshka checkpoints atomically (see
    ``checkpoints``), SAELens's loaders check Matryoshka folders and read
    checkpoints as the SAE their run would save (see ``loaders``), and its
    progress bar count steps (see ``progress``), and its step outputs keep
    no pre-activations into the next step (see ``kept_outputs``), and it orders
    latents by firing frequency when asked (see ``latent_order``), and each run is
    seeded from its config (see ``seeding``), recorded locally (see ``run_record``) and
    free of SAELens's known noise (see ``quiet``). With SAEDashboard installed,
    SAEDashboard renders Matryoshka SAEs (see ``dashboard``).
    """
    checkpoints.install()
    hub_misses.install()  # first: beneath loaders' wrapper of the same Hub loader
    loaders.install()
    save_paths.install()
    run_checks.install()
    progress.install()
    kept_outputs.install()
    latent_order.install()
    seeding.install()
    run_record.install()
    quiet.install()  # last: outermost, its filters cover the wrappers above
    if dashboard.dashboard_installed():
        dashboard.install()
    _register(SAE_TRAINING_CLASS_REGISTRY, (MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig))
    _register(SAE_CLASS_REGISTRY, (MatryoshkaSAE, MatryoshkaSAEConfig))
