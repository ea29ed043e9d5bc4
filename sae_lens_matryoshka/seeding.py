"""A Matryoshka run's ``seed``: SAELens's runner config has one, and its training runner never uses it.

``LanguageModelSAERunnerConfig.seed`` (42 by default) reaches only SAELens's
pretokenizing and activation-caching runners. ``LanguageModelSAETrainingRunner``
draws the SAE's initial weights (``initialize_weights``' Kaiming-uniform
decoder) and the activation buffer's shuffles (``mixing_buffer``'s
``torch.randperm``) from torch's global generator in whatever state the
process left it, and torch seeds that generator from the operating system's
entropy when a process starts: the same command twice trained two different
dictionaries. For a Matryoshka run the plugin wraps the runner:

- ``__init__`` seeds torch's global generator (every device's) with ``cfg.seed``
  before it loads anything, so the model's own random initialisation (before
  its weights load) and then the SAE's are drawn alike every time;
- ``run`` seeds it again, with a seed derived from ``cfg.seed``
  (:func:`derived_seed`), just before training, so that whatever drew random
  numbers between the two (a notebook, a test, another runner) leaves the
  activation shuffles as they were, and those shuffles do not replay the
  numbers the SAE's weights were drawn from.

The rest of a run is already seeded or deterministic: the prefix sampler has
its own generator, seeded by ``prefix_sampling_seed`` and kept in
checkpoints (``levels``); BatchTopK's sampled threshold uses a private
generator with a fixed seed (``kernels.selection``); a measured kernel keeps
its choice for the machine (``kernels.measured``); and the CPU kernels of the
sparse path (``index_add_``, ``embedding_bag``, the CSR product) sum in a fixed
order at any thread count. Other runs go through SAELens's code as before.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import torch
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

from sae_lens_matryoshka.config import is_matryoshka


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` from the run's ``seed``: the same in every process, below 2**63."""
    digest = hashlib.sha256(f"sae_lens_matryoshka:{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def install() -> None:
    """Seed a Matryoshka run's SAE and activation shuffles from ``cfg.seed``. Idempotent."""
    runner = LanguageModelSAETrainingRunner
    if getattr(runner, "_matryoshka_seeding", False):
        return
    init = runner.__init__
    run = runner.run

    @functools.wraps(init)
    def __init__(
        self: LanguageModelSAETrainingRunner[Any], cfg: Any, *args: Any, **kwargs: Any
    ) -> None:
        if is_matryoshka(cfg.sae):
            torch.manual_seed(cfg.seed)
        init(self, cfg, *args, **kwargs)

    @functools.wraps(run)
    def run_seeded(self: LanguageModelSAETrainingRunner[Any]) -> Any:
        if is_matryoshka(self.cfg.sae):
            torch.manual_seed(derived_seed(self.cfg.seed, "activation shuffles"))
        return run(self)

    runner.__init__ = __init__
    runner.run = run_seeded
    runner._matryoshka_seeding = True
