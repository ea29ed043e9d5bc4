"""Registering ``"matryoshka"`` with SAELens's architecture registries.

SAELens looks architectures up by name when it builds an SAE from a runner
config, a ``cfg.json`` or the command line. Registration happens on
``import sae_lens_matryoshka`` and must be idempotent: a second import, an
``importlib.reload`` or a notebook re-running cells must not fail.
"""

from __future__ import annotations

from typing import Any

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_matryoshka import checkpoints, loaders, progress
from sae_lens_matryoshka.config import (
    ARCHITECTURE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.inference_sae import MatryoshkaSAE
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
    progress bar count every step (see ``progress``).
    """
    checkpoints.install()
    loaders.install()
    progress.install()
    _register(SAE_TRAINING_CLASS_REGISTRY, (MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig))
    _register(SAE_CLASS_REGISTRY, (MatryoshkaSAE, MatryoshkaSAEConfig))
