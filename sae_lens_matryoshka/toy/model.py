"""A toy model with hierarchical features, in the spirit of the Matryoshka paper's.

Parents fire independently; each parent's children are mutually exclusive and
fire only with their parent; independent features fire on their own. Every
feature has an orthogonal unit direction in the model's space and fires with
magnitude 1. This is where feature absorption is easy to see: a plain SAE
folds the parent into its children's latents, so the parent's latent stops
firing whenever a child fires.

The data come from SAELens's ``sae_lens.synthetic`` (``HierarchyNode``,
``ActivationGenerator``, ``FeatureDictionary``), so the ground truth can also be
fed to SAELens's own synthetic evals. ``ToyHierarchy.nabeshima`` is the set-up
of Noa Nabeshima's Matryoshka toy, which the toy experiment (``toy.demo``) uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from sae_lens import SAE, LoggingConfig, TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    HierarchyNode,
    hierarchy_modifier,
)
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka.evals import decoder_feature_cosines

# torch on one thread: at the toy's size every tensor is tiny and intra-op threads only
# add synchronisation (on this project's 2-core machine, building the toy's orthogonal
# feature directions took 2 to 5 s on two threads and 0.08 s on one, and training one
# seed's pair of SAEs 14 s against 8 s)
from sae_lens_matryoshka.kernels.threads import single_thread


def short_run_trainer_config(
    steps: int,
    batch_size: int,
    lr: float,
    dead_feature_window: int,
    device: str = "cpu",
    lr_warm_up_steps: int = 0,
) -> SAETrainerConfig:
    """A SAELens trainer config for a short constant-learning-rate run without logging.

    ``lr_warm_up_steps`` ramps the learning rate up linearly first (SAELens's warm-up).
    """
    return SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=steps * batch_size,
        device=device,
        autocast=False,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=lr_warm_up_steps,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=0,
        n_restart_cycles=1,
        train_batch_size_samples=batch_size,
        dead_feature_window=dead_feature_window,
        feature_sampling_window=steps + 1,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
    )


def _seed_generator(*seeds: int) -> torch.Generator:
    """A generator of batch seeds determined by ``seeds``; distinct tuples give unrelated streams."""
    digest = hashlib.sha256(repr(seeds).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class ToyHierarchy:
    """Ground truth and a sampler for the hierarchical toy model.

    Args:
        n_parents: number of parent features.
        children_per_parent: mutually exclusive children of each parent.
        n_independent: features outside the hierarchy.
        parent_probability: firing probability of each parent.
        child_probability: probability that some child fires when its parent
            does (each child equally likely).
        independent_probability: firing probability of each independent feature.
        seed: seed of the feature directions and of the sampler.
    """

    n_parents: int = 3
    children_per_parent: int = 3
    n_independent: int = 4
    parent_probability: float = 0.15
    child_probability: float = 0.6
    independent_probability: float = 0.02
    seed: int = 0
    parents: list[int] = field(init=False)
    children: dict[int, list[int]] = field(init=False)
    independents: list[int] = field(init=False)

    @classmethod
    def nabeshima(cls, seed: int = 0) -> ToyHierarchy:
        """Noa Nabeshima's Matryoshka toy (``tree.json`` of github.com/noanabeshima/matryoshka-saes).

        3 parents firing with probability 0.15, each with 3 mutually exclusive
        children (0.2 each, no child 0.4), and 8 independent features at 0.05:
        20 features in 20 dimensions. Parents are the most frequent features
        (0.15, against 0.05 for an independent one and 0.03 for a child), so a
        3-latent first level is best spent on exactly the parents.
        """
        return cls(
            n_parents=3,
            children_per_parent=3,
            n_independent=8,
            parent_probability=0.15,
            child_probability=0.6,
            independent_probability=0.05,
            seed=seed,
        )

    def __post_init__(self) -> None:
        if self.children_per_parent < 2:
            raise ValueError(
                f"children_per_parent must be >= 2 for mutually exclusive children, "
                f"got {self.children_per_parent}."
            )
        for name in ("parent_probability", "child_probability", "independent_probability"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")
        self.parents, self.children = [], {}
        roots: list[HierarchyNode] = []
        probabilities: list[float] = []
        # independent draws per child, then mutual exclusion keeps one of the
        # firing ones: P(some child | parent) = 1 - (1 - q)**n = child_probability
        child_base = 1 - (1 - self.child_probability) ** (1 / self.children_per_parent)
        for _ in range(self.n_parents):
            parent = len(probabilities)
            probabilities.append(self.parent_probability)
            kids = list(range(parent + 1, parent + 1 + self.children_per_parent))
            probabilities.extend([child_base] * self.children_per_parent)
            self.parents.append(parent)
            self.children[parent] = kids
            roots.append(
                HierarchyNode(
                    feature_index=parent,
                    children=[HierarchyNode(feature_index=kid) for kid in kids],
                    mutually_exclusive_children=True,
                )
            )
        self.independents = list(range(len(probabilities), self.n_features))
        probabilities.extend([self.independent_probability] * self.n_independent)
        self._generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.activations = ActivationGenerator(
                len(probabilities),
                torch.tensor(probabilities),
                modify_activations=hierarchy_modifier(roots),
            )
        with single_thread():
            self.dictionary = FeatureDictionary(self.n_features, self.n_features, seed=self.seed)

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children_per_parent) + self.n_independent

    @property
    def expected_l0(self) -> float:
        """Average number of active features per sample."""
        per_parent = self.parent_probability * (1 + self.child_probability)
        return self.n_parents * per_parent + self.n_independent * self.independent_probability

    @property
    def directions(self) -> torch.Tensor:
        """Unit feature directions, ``[n_features, d_model]``."""
        return self.dictionary.feature_vectors.detach()

    @property
    def labels(self) -> list[str]:
        """A short name per feature: ``P1`` a parent, ``C1a`` a child of ``P1``, ``I1`` independent."""
        names = [""] * self.n_features
        for i, parent in enumerate(self.parents, start=1):
            names[parent] = f"P{i}"
            for j, child in enumerate(self.children[parent]):
                names[child] = f"C{i}{chr(ord('a') + j)}"
        for i, feature in enumerate(self.independents, start=1):
            names[feature] = f"I{i}"
        return names

    @property
    def general_to_specific(self) -> list[int]:
        """Feature indices ordered parents, children (grouped by parent), independents.

        The order a Matryoshka SAE's levels should follow on a figure: the
        parents its first level holds come first.
        """
        children = [child for parent in self.parents for child in self.children[parent]]
        return [*self.parents, *children, *self.independents]

    @torch.no_grad()
    def _draw(self, n: int, seeds: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples (features, model activations) from the next batch seed of ``seeds``.

        SAELens's sampler draws from torch's global generator, so it runs on a
        copy of it seeded with the batch seed, which leaves the global generator
        as it was. The copy is seeded by setting its state, not with
        ``manual_seed`` (which also queues a re-seed of every accelerator, with
        a stack trace each time: a tenth of a toy training step); the samples
        are the same.
        """
        batch_seed = int(torch.randint(0, 2**62, (1,), generator=seeds))
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(torch.Generator().manual_seed(batch_seed).get_state())
            features = self.activations.sample(n)
        return features, self.dictionary(features)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` samples: (feature activations ``[n, n_features]``, model activations ``[n, d_model]``)."""
        return self._draw(n, self._generator)

    def batches(self, batch_size: int, stream: int | None = None) -> Iterator[torch.Tensor]:
        """An endless stream of model-activation batches, e.g. for ``SAETrainer``.

        Without ``stream`` the batches come from ``sample``. With it, from
        batch seeds of their own, the same for every call with that ``stream``
        and unrelated to ``sample``'s: two SAEs can train on identical batches
        and be evaluated on samples neither has seen.
        """
        seeds = self._generator if stream is None else _seed_generator(self.seed, stream)
        while True:
            yield self._draw(batch_size, seeds)[1]

    def train(
        self,
        sae: TrainingSAE,
        steps: int,
        batch_size: int = 512,
        lr: float = 3e-3,
        dead_feature_window: int = 20,
        stream: int | None = None,
        lr_warm_up_steps: int = 0,
    ) -> None:
        """Train ``sae`` with SAELens's own ``SAETrainer`` on fresh toy batches (see ``batches``).

        A short ``dead_feature_window`` lets the dead-latent aux loss revive
        latents within a toy-length run.
        """
        cfg = short_run_trainer_config(
            steps,
            batch_size,
            lr,
            dead_feature_window,
            device=str(sae.device),
            lr_warm_up_steps=lr_warm_up_steps,
        )
        SAETrainer(cfg=cfg, sae=sae, data_provider=self.batches(batch_size, stream)).fit()

    @torch.no_grad()
    def decoder_cosines(self, sae: SAE) -> torch.Tensor:
        """Cosine of every latent's decoder with every true feature: ``[d_sae, n_features]``."""
        return decoder_feature_cosines(sae.W_dec, self.directions)
