"""Matryoshka variants on the hierarchical toy model: parents land in the first level, absorption drops.

A 2x overcomplete dictionary (32 latents for 16 features) whose first level
has 6 latents for the 3 parents. SAELens's plain BatchTopK at the same width
and L0 is the control that shows absorption.
"""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

from sae_lens_matryoshka import (
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.evals import hierarchy_absorption
from sae_lens_matryoshka.toy import ToyHierarchy, single_thread

FIRST_LEVEL = 6
STEPS = 1000


@pytest.fixture(scope="module")
def toy() -> ToyHierarchy:
    return ToyHierarchy(seed=0)


def absorption(sae, toy: ToyHierarchy, among: int | None = None) -> float:
    features, x = toy.sample(20000)
    return hierarchy_absorption(sae, features, x, toy.directions, toy.children, among)["absorption"]


@pytest.fixture(scope="module")
def plain_absorption(toy: ToyHierarchy) -> float:
    torch.manual_seed(0)
    n = toy.n_features
    plain = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=n, d_sae=2 * n, k=toy.expected_l0))
    toy.train(plain, STEPS)
    return absorption(plain, toy)


def test_plain_batchtopk_absorbs_a_parent(plain_absorption: float) -> None:
    # some parents' latents go silent when one of their children fires
    assert plain_absorption > 0.15, plain_absorption


@pytest.mark.parametrize(
    "fields",
    [
        {"activation": "batchtopk", "prefix_sampling": "fixed"},
        {"activation": "relu", "prefix_sampling": "pareto", "l1_coefficient": 0.05},
    ],
    ids=["fixed-batchtopk", "pareto-relu"],
)
def test_matryoshka_recovers_parents_in_the_first_level(
    fields: dict, toy: ToyHierarchy, plain_absorption: float
) -> None:
    torch.manual_seed(0)
    n = toy.n_features
    k = toy.expected_l0 if fields["activation"] == "batchtopk" else None
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=n,
            d_sae=2 * n,
            k=k,
            matryoshka_widths=[FIRST_LEVEL, 2 * n],
            use_matryoshka_aux_loss=True,
            **fields,
        )
    )
    toy.train(sae, STEPS)
    cosines = toy.decoder_cosines(sae)
    first_level_best = cosines[:FIRST_LEVEL, toy.parents].max(dim=0).values
    assert (first_level_best > 0.9).all(), first_level_best
    ours = absorption(sae, toy, among=FIRST_LEVEL)
    assert ours < plain_absorption, (ours, plain_absorption)


def test_toy_statistics_match_its_configuration() -> None:
    toy = ToyHierarchy(
        n_parents=2,
        children_per_parent=3,
        n_independent=3,
        parent_probability=0.3,
        child_probability=0.6,
        independent_probability=0.1,
        seed=1,
    )
    features, x = toy.sample(40000)
    assert features.shape == (40000, 11) and x.shape == (40000, 11)
    firing = (features > 0).float()
    for parent in toy.parents:
        kids = firing[:, toy.children[parent]]
        assert firing[:, parent].mean().item() == pytest.approx(0.3, abs=0.01)
        assert torch.all(
            kids.sum(-1) <= firing[:, parent]
        )  # children only with their parent, one at a time
        with_parent = kids[firing[:, parent] > 0]
        assert with_parent.sum(-1).mean().item() == pytest.approx(0.6, abs=0.015)
    assert firing[:, 8:].mean().item() == pytest.approx(0.1, abs=0.01)
    assert firing.sum(-1).mean().item() == pytest.approx(toy.expected_l0, abs=0.02)
    torch.testing.assert_close(toy.directions @ toy.directions.T, torch.eye(11), atol=1e-4, rtol=0)
    torch.testing.assert_close(x, features @ toy.directions)


def test_toy_is_reproducible_and_rejects_bad_settings() -> None:
    torch.testing.assert_close(
        ToyHierarchy(seed=3).sample(50)[1], ToyHierarchy(seed=3).sample(50)[1]
    )
    assert not torch.equal(ToyHierarchy(seed=3).sample(50)[0], ToyHierarchy(seed=4).sample(50)[0])
    with pytest.raises(ValueError, match="children_per_parent must be >= 2"):
        ToyHierarchy(children_per_parent=1)
    with pytest.raises(
        ValueError, match=r"parent_probability must be a probability in \[0, 1\], got 1.5"
    ):
        ToyHierarchy(parent_probability=1.5)


def test_nabeshima_toy_has_his_structure_and_frequencies() -> None:
    toy = ToyHierarchy.nabeshima(seed=0)
    assert toy.n_features == 20 and toy.directions.shape == (20, 20)
    assert len(toy.parents) == 3 and len(toy.independents) == 8
    assert all(len(kids) == 3 for kids in toy.children.values())
    features, _ = toy.sample(60000)
    firing = (features > 0).float().mean(0)
    children = [child for kids in toy.children.values() for child in kids]
    for group, probability in ((toy.parents, 0.15), (children, 0.03), (toy.independents, 0.05)):
        assert firing[group].tolist() == pytest.approx([probability] * len(group), abs=0.006)
    assert toy.expected_l0 == pytest.approx(3 * 0.15 * 1.6 + 8 * 0.05)


def test_labels_and_display_order_follow_the_hierarchy() -> None:
    toy = ToyHierarchy(n_parents=2, children_per_parent=2, n_independent=3, seed=0)
    order = toy.general_to_specific
    assert sorted(order) == list(range(toy.n_features))
    assert order[:2] == toy.parents
    assert order[2:6] == [*toy.children[toy.parents[0]], *toy.children[toy.parents[1]]]
    assert order[6:] == toy.independents
    labels = toy.labels
    assert [labels[p] for p in toy.parents] == ["P1", "P2"]
    assert [labels[c] for c in toy.children[toy.parents[1]]] == ["C2a", "C2b"]
    assert [labels[i] for i in toy.independents] == ["I1", "I2", "I3"]


def test_streams_repeat_and_leave_the_global_generator_alone() -> None:
    toy = ToyHierarchy.nabeshima(seed=2)
    before = torch.get_rng_state()
    first, again = toy.batches(64, stream=1), toy.batches(64, stream=1)
    for _ in range(3):
        torch.testing.assert_close(next(first), next(again))
    assert not torch.equal(next(toy.batches(64, stream=1)), next(toy.batches(64, stream=2)))
    # the toy's own samples (what the demo evaluates on) are not the training stream
    assert not torch.equal(toy.sample(64)[1], next(toy.batches(64, stream=1)))
    assert torch.equal(torch.get_rng_state(), before)
    assert not next(toy.batches(8, stream=1)).requires_grad


def test_single_thread_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), single_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("restored even when the body fails")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
