"""The feature tree: each criterion on hand-built firing patterns, streaming, bounds, and ground truth.

Hand-built codes check one criterion at a time (the others held satisfied)
and the edge cases. Trained toys of other shapes than the demo's (5 parents
with 2 children each; a three-deep tree from ``sae_lens.synthetic``) check
that a Matryoshka SAE's recovered tree is the true one, and that a plain
SAE's tree shows the absorption.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.synthetic import (
    ActivationGenerator,
    HierarchyNode,
    hierarchy_modifier,
)
from sae_lens.training.activations_store import ActivationsStore

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.evals import hierarchy_absorption
from sae_lens_matryoshka.hierarchy import (
    CoFiringCounter,
    HierarchyCriteria,
    LatentHierarchy,
    edge_recovery,
    find_hierarchy,
    hierarchy_from_codes,
)
from sae_lens_matryoshka.progress import hidden_trainer_bar
from sae_lens_matryoshka.toy import ToyHierarchy, single_thread
from tests.conftest import build_tiny_model, build_token_dataset, tiny_runner_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TOKENS = 400


def codes(firing: dict[int, list[int]], d_sae: int = 8, n_tokens: int = N_TOKENS) -> torch.Tensor:
    """Dense codes ``[n_tokens, d_sae]``: latent ``j`` fires (value 1) on ``firing[j]``'s tokens."""
    out = torch.zeros(n_tokens, d_sae)
    for latent, tokens in firing.items():
        out[tokens, latent] = 1.0
    return out


def tokens(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


#: latent 1 (level 1) fires on 100 of 400 tokens; latent 5 (level 2) on 30 of them
PARENT_AND_CHILD = {1: tokens(0, 100), 5: tokens(0, 30)}


def test_a_child_firing_only_with_its_parent_that_fires_without_it_is_its_child() -> None:
    tree = hierarchy_from_codes(codes(PARENT_AND_CHILD), widths=[4, 8])
    assert tree.edges == [(1, 5)]
    (edge,) = tree.evidence
    assert (edge.co_firings, edge.parent_given_child) == (30, 1.0)
    assert edge.child_given_parent == pytest.approx(0.3)
    assert edge.decoder_cosine is None  # no decoder given
    assert tree.firings == {1: 100, 5: 30} and tree.n_tokens == N_TOKENS
    assert (tree.level(1), tree.level(5)) == (0, 1)
    assert tree.parents == {5: 1} and tree.children == {1: [5]} and tree.roots == [1]


def test_criterion_the_child_fires_almost_only_with_its_parent() -> None:
    # the child fires 30 times, 24 of them with the parent: P(parent | child) = 0.8
    firing = {1: tokens(0, 100), 5: [*tokens(0, 24), *tokens(200, 206)]}
    assert hierarchy_from_codes(codes(firing), [4, 8]).edges == []
    tree = hierarchy_from_codes(codes(firing), [4, 8], min_parent_given_child=0.75)
    assert tree.edges == [(1, 5)]
    assert tree.evidence[0].parent_given_child == pytest.approx(0.8)


def test_criterion_the_parent_fires_without_the_child_too() -> None:
    # the child is on 95 of the parent's 100 tokens: the parent hardly fires alone
    firing = {1: tokens(0, 100), 5: tokens(0, 95)}
    assert hierarchy_from_codes(codes(firing), [4, 8]).edges == []
    loose = hierarchy_from_codes(codes(firing), [4, 8], max_child_given_parent=0.96)
    assert loose.edges == [(1, 5)]
    # two latents that always fire together are duplicates, whatever the threshold
    twins = {1: tokens(0, 100), 5: tokens(0, 100)}
    assert hierarchy_from_codes(codes(twins), [4, 8], max_child_given_parent=1.0).edges == []


def test_criterion_more_often_than_chance() -> None:
    # a latent on 90% of all tokens fires with every child: lift 1.1
    firing = {1: tokens(0, 360), 5: tokens(0, 30)}
    assert hierarchy_from_codes(codes(firing), [4, 8]).edges == []
    assert hierarchy_from_codes(codes(firing), [4, 8], min_lift=1.0).edges == [(1, 5)]


def test_criterion_the_parent_is_not_in_a_later_level() -> None:
    # the frequent latent 6 is in level 2, the rare latent 2 in level 1: no edge either way
    later = {6: tokens(0, 100), 2: tokens(0, 30)}
    assert hierarchy_from_codes(codes(later), [4, 8]).edges == []
    # both in level 2: an edge by default, none when the parent must be strictly earlier
    same = {5: tokens(0, 100), 6: tokens(0, 30)}
    assert hierarchy_from_codes(codes(same), [4, 8]).edges == [(5, 6)]
    assert hierarchy_from_codes(codes(same), [4, 8], allow_same_level=False).edges == []
    assert hierarchy_from_codes(codes(PARENT_AND_CHILD), [4, 8], allow_same_level=False).edges == [
        (1, 5)
    ]


def test_criterion_enough_firings() -> None:
    firing = {1: tokens(0, 100), 5: tokens(0, 5)}
    assert hierarchy_from_codes(codes(firing), [4, 8]).edges == []
    assert hierarchy_from_codes(codes(firing), [4, 8], min_child_firings=5).edges == [(1, 5)]


def test_criterion_decoder_cosine_when_asked() -> None:
    W_dec = torch.eye(8)
    W_dec[5] = torch.tensor([0.0, 0.6, 0, 0, 0, 0.8, 0, 0])  # cosine 0.6 with latent 1
    tree = hierarchy_from_codes(codes(PARENT_AND_CHILD), [4, 8], W_dec)
    assert tree.evidence[0].decoder_cosine == pytest.approx(0.6)
    assert hierarchy_from_codes(
        codes(PARENT_AND_CHILD), [4, 8], W_dec, min_decoder_cosine=0.5
    ).edges
    assert not hierarchy_from_codes(
        codes(PARENT_AND_CHILD), [4, 8], W_dec, min_decoder_cosine=0.7
    ).edges
    with pytest.raises(ValueError, match="min_decoder_cosine needs the SAE's decoder"):
        hierarchy_from_codes(codes(PARENT_AND_CHILD), [4, 8], min_decoder_cosine=0.5)


def test_a_child_gets_its_nearest_ancestor_not_a_grandparent() -> None:
    # 0 -> 3 -> 7: latent 7 fires only with 3 and with 0; its parent is 3
    firing = {0: tokens(0, 160), 3: tokens(0, 60), 7: tokens(0, 20)}
    tree = hierarchy_from_codes(codes(firing), [2, 4, 8])
    assert tree.edges == [(0, 3), (3, 7)]
    assert tree.roots == [0]


def test_edge_cases_no_firing_one_level_and_a_latent_that_never_fires() -> None:
    silent = hierarchy_from_codes(codes({}), [4, 8])
    assert silent.edges == [] and silent.firings == {} and silent.n_tokens == N_TOKENS
    # one level (a plain SAE): every edge is within it; latent 7 never fires
    flat = hierarchy_from_codes(codes(PARENT_AND_CHILD), [8])
    assert flat.edges == [(1, 5)] and (flat.level(1), flat.level(5)) == (0, 0)
    assert 7 not in flat.firings
    # no tokens at all
    assert hierarchy_from_codes(torch.zeros(0, 8), [4, 8]).edges == []


def random_hierarchy_codes(
    n_tokens: int, seed: int = 0
) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """Codes of 64 latents: 4 parents (level 1) with 3 exclusive children each, plus noise latents."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(n_tokens, 64)
    true = set()
    for parent in range(4):
        on = torch.rand(n_tokens, generator=generator) < 0.2
        out[on, parent] = 1
        which = torch.randint(0, 4, (n_tokens,), generator=generator)  # 3: no child
        for j in range(3):
            child = 8 + 3 * parent + j
            out[on & (which == j), child] = 1
            true.add((parent, child))
    noise = torch.rand(n_tokens, 44, generator=generator) < 0.05
    out[:, 20:] = torch.where(noise, 1.0, out[:, 20:])
    return out, true


def test_streaming_in_batches_equals_one_pass_dense_or_sparse() -> None:
    all_codes, true = random_hierarchy_codes(3000)
    whole = hierarchy_from_codes(all_codes, [8, 64])
    assert set(whole.edges) == true
    uneven = [all_codes[:7], all_codes[7:1000], all_codes[1000:1001], all_codes[1001:]]
    batched = hierarchy_from_codes(iter(uneven), [8, 64])
    sparse = hierarchy_from_codes((batch.to_sparse() for batch in uneven), [8, 64])
    assert batched.evidence == whole.evidence == sparse.evidence
    assert batched.firings == whole.firings


def test_memory_is_bounded_by_the_candidates_per_child() -> None:
    all_codes, true = random_hierarchy_codes(3000)
    counter = CoFiringCounter([8, 64], max_candidates=2, seed_firings=8)
    for batch in all_codes.split(100):
        tokens_, latents = batch.nonzero(as_tuple=True)
        counter.add(tokens_, latents, n_tokens=batch.shape[0])
        per_child = torch.bincount(counter.keys // 64, minlength=64)
        assert int(per_child.max()) <= 2
    assert counter.stats["refused"] > 0 and counter.stats["pruned"] > 0
    assert counter.stats["most_tracked_pairs"] <= 64 * 2
    # the most co-firing candidates are the ones kept: the parents survive
    assert set(counter.hierarchy(HierarchyCriteria()).edges) == true


def test_bad_arguments_are_named() -> None:
    sparse_codes = codes(PARENT_AND_CHILD)
    with pytest.raises(
        ValueError, match=r"min_parent_given_child must be a probability in \[0, 1\], got 1.5"
    ):
        hierarchy_from_codes(sparse_codes, [4, 8], min_parent_given_child=1.5)
    with pytest.raises(ValueError, match=r"prune_below \(0.95\) must not exceed"):
        hierarchy_from_codes(sparse_codes, [4, 8], prune_below=0.95)
    with pytest.raises(
        ValueError, match=r"widths must be positive and strictly increasing, got \[4, 4, 8\]"
    ):
        hierarchy_from_codes(sparse_codes, [4, 4, 8])
    with pytest.raises(ValueError, match="batch 0 has 8 latents, the widths end at 16"):
        hierarchy_from_codes(sparse_codes, [4, 16])
    with pytest.raises(
        ValueError, match=r"batch 1 must be a 2-d tensor \[n_tokens, d_sae=8\], got a list"
    ):
        hierarchy_from_codes([sparse_codes, [1, 2]], [4, 8])
    with pytest.raises(ValueError, match="max_candidates must be >= 1, got 0"):
        hierarchy_from_codes(sparse_codes, [4, 8], max_candidates=0)


@pytest.fixture
def small_sae() -> MatryoshkaSAE:
    torch.manual_seed(0)
    return MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=16, d_sae=32, matryoshka_widths=[4, 32], activation="relu")
    )


def test_find_hierarchy_refuses_bad_input(small_sae: MatryoshkaSAE) -> None:
    with pytest.raises(
        ValueError,
        match=r"batch 0 must be a tensor \[..., d_in=16\], got a tensor of shape \(5, 8\)",
    ):
        find_hierarchy(small_sae, torch.zeros(5, 8))
    with pytest.raises(ValueError, match=r"activations must be a tensor .* got a int"):
        find_hierarchy(small_sae, 3)
    with pytest.raises(ValueError, match="model= goes with an ActivationsStore"):
        find_hierarchy(small_sae, torch.zeros(5, 16), model=build_tiny_model())
    with pytest.raises(TypeError, match=r"unknown options \['min_parent'\]"):
        find_hierarchy(small_sae, torch.zeros(5, 16), min_parent=0.5)
    with pytest.raises(ValueError, match=r"widths must end at the SAE's d_sae=32, got \[4, 16\]"):
        find_hierarchy(small_sae, torch.zeros(5, 16), widths=[4, 16])


def test_find_hierarchy_reads_an_activation_store_and_labels_latents_by_top_tokens() -> None:
    torch.manual_seed(0)
    model = build_tiny_model()
    cfg = tiny_runner_cfg()
    store = ActivationsStore.from_config(model, cfg, override_dataset=build_token_dataset())
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=16, d_sae=32, matryoshka_widths=[4, 32], activation="relu")
    )
    sae.cfg.metadata.hook_name = cfg.hook_name
    with pytest.raises(ValueError, match="pass model="):
        find_hierarchy(sae, store)
    # a low bar, so that a random SAE on a random model has edges to label
    tree = find_hierarchy(
        sae,
        store,
        model=model,
        n_batches=2,
        min_child_firings=2,
        min_lift=0,
        min_parent_given_child=0.5,
        prune_below=0.5,
    )
    assert tree.n_tokens == 2 * cfg.store_batch_size_prompts * cfg.context_size
    assert tree.edges and set(tree.labels) == set(tree.firings)
    # the tiny model has no tokenizer: each label lists token ids, strongest first
    assert all(label.startswith("#") for label in tree.labels.values())


def test_json_round_trip_and_the_plot(tmp_path: Path) -> None:
    firing = {0: tokens(0, 160), 3: tokens(0, 60), 7: tokens(0, 20), 6: tokens(100, 130)}
    tree = hierarchy_from_codes(codes(firing), [2, 4, 8], torch.randn(8, 4))
    tree.labels = {3: "a label"}
    saved = tree.save(tmp_path / "tree.json")
    assert LatentHierarchy.load(saved) == tree
    data = json.loads(saved.read_text())
    assert data["edges"][0] == {
        "parent": 0,
        "child": 3,
        "co_firings": 60,
        "parent_given_child": 1.0,
        "child_given_parent": 0.375,
        "decoder_cosine": tree.evidence[0].decoder_cosine,
    }
    with pytest.raises(ValueError, match="not a feature tree of this version"):
        LatentHierarchy.from_json({"format": "something else"})
    png = tree.plot(tmp_path / "tree.png", labels={7: "leaf"}, latents=[5])
    assert png.read_bytes()[:8] == PNG_MAGIC
    # an empty tree draws too
    empty = hierarchy_from_codes(codes({}), [4, 8]).plot(tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- trained toys, ground truth


class DeepToy:
    """A three-deep tree from ``sae_lens.synthetic``: 2 roots, 2 exclusive children each, 2 each again.

    Roots fire with probability 0.25, a node has some child on 80% of its
    firings; 4 independent features at 0.04: 18 features. Only the feature
    activations are used (the codes of a perfect SAE).
    """

    def __init__(self, seed: int = 0) -> None:
        self.children: dict[int, list[int]] = {}
        probabilities: list[float] = []
        child_base = 1 - 0.2**0.5  # two exclusive children: some child 80% of the time

        def node(probability: float, depth: int) -> HierarchyNode:
            index = len(probabilities)
            probabilities.append(probability)
            if depth == 0:
                return HierarchyNode(feature_index=index)
            kids = [node(child_base, depth - 1) for _ in range(2)]
            self.children[index] = [kid.feature_index for kid in kids]
            return HierarchyNode(index, kids, mutually_exclusive_children=True)

        roots = [node(0.25, 2) for _ in range(2)]
        probabilities.extend([0.04] * 4)
        self.n_features = len(probabilities)
        self.activations = ActivationGenerator(
            self.n_features,
            torch.tensor(probabilities),
            modify_activations=hierarchy_modifier(roots),
        )


def wide_toy() -> ToyHierarchy:
    """5 parents with 2 exclusive children each, 4 independent features (19 features)."""
    return ToyHierarchy(
        n_parents=5,
        children_per_parent=2,
        n_independent=4,
        parent_probability=0.15,
        child_probability=0.6,
        independent_probability=0.05,
        seed=0,
    )


STEPS = 1200


def matryoshka_relu(d_in: int, widths: list[int]) -> MatryoshkaTrainingSAE:
    """The demo's kind of Matryoshka SAE (ReLU + L1, per-level aux loss), seeded."""
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=d_in,
            d_sae=widths[-1],
            matryoshka_widths=widths,
            activation="relu",
            l1_coefficient=0.1,
            use_matryoshka_aux_loss=True,
        )
    )


@pytest.fixture(scope="module")
def wide() -> dict[str, dict]:
    """The wide toy, a Matryoshka SAE (levels 5 / 24) and a plain BatchTopK SAE: trees and absorption."""
    toy = wide_toy()
    torch.manual_seed(0)
    plain = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=toy.n_features, d_sae=24, k=toy.expected_l0)
    )
    found = {}
    with single_thread(), hidden_trainer_bar():
        for name, sae in (
            ("matryoshka", matryoshka_relu(toy.n_features, [5, 24])),
            ("plain", plain),
        ):
            toy.train(sae, STEPS, lr=3e-3, stream=1, lr_warm_up_steps=STEPS // 5)
            features, x = toy.sample(20_000)
            tree = find_hierarchy(sae, x)
            cosines = toy.decoder_cosines(sae)
            best = cosines.argmax(dim=0).tolist()
            absorbed = {
                (best[edge["parent"]], best[edge["child"]])
                for edge in hierarchy_absorption(sae, features, x, toy.directions, toy.children)[
                    "edges"
                ]
                if edge["recall_with_child"] < 0.8
            }
            found[name] = {
                "tree": tree,
                "recovery": edge_recovery(tree.edges, toy.children, cosines),
                "absorbed": absorbed,
            }
    return found


def test_a_matryoshka_sae_recovers_the_true_tree_of_a_wide_toy(wide: dict[str, dict]) -> None:
    tree, recovery = wide["matryoshka"]["tree"], wide["matryoshka"]["recovery"]
    assert recovery["precision"] >= 0.9 and recovery["recall"] >= 0.9, (recovery, tree.edges)
    # besides: at most one correction latent per parent (it fires when the parent fires alone)
    assert recovery["unjudged"] <= 5, tree.edges
    assert all(tree.level(parent) == 0 for parent, _ in tree.edges)
    assert not wide["matryoshka"]["absorbed"]


def test_a_plain_saes_tree_shows_absorption_children_without_parents(wide: dict[str, dict]) -> None:
    """Every edge the plain SAE absorbed (the parent's latent silent on a fifth of the child's
    samples or more) is missing from its tree: the child's latent has no such parent."""
    tree, absorbed = wide["plain"]["tree"], wide["plain"]["absorbed"]
    assert absorbed, "the plain SAE absorbed nothing: no control"
    assert not absorbed & set(tree.edges), tree.edges
    assert wide["plain"]["recovery"]["recall"] < wide["matryoshka"]["recovery"]["recall"]


@pytest.mark.parametrize("widths", [[2, 6, 18], [18]], ids=["levels-by-depth", "one-level"])
def test_the_criterion_recovers_a_three_deep_tree_from_its_true_codes(widths: list[int]) -> None:
    """The deep toy's own feature activations as the codes of a perfect SAE, roots first.

    Its latents are the true features, ordered roots, children, the rest; with
    levels 2 / 6 / 18 they sit in the level of their depth, with one level
    only co-firing tells parents from children. (A Matryoshka SAE trained on
    this toy for 1200 steps learns its features only to decoder cosines
    0.5-0.9, too loosely for its tree to be judged here.)
    """
    toy = DeepToy()
    roots = [0, 7]
    middle = [child for root in roots for child in toy.children[root]]
    order = roots + middle + [f for f in range(toy.n_features) if f not in roots + middle]
    cosines = torch.eye(toy.n_features)[order]  # latent i is feature order[i]
    with torch.random.fork_rng():
        torch.manual_seed(1)
        features = toy.activations.sample(20_000)
    tree = hierarchy_from_codes(features[:, order], widths)
    assert edge_recovery(tree.edges, toy.children, cosines) == {
        "precision": 1.0,
        "recall": 1.0,
        "unjudged": 0,
    }
    assert len(tree.edges) == 12 and tree.roots == [0, 1]


def test_the_scale_benchmark_finds_its_planted_tree_at_a_small_size(
    benchmark: Callable[[str], ModuleType],
) -> None:
    """``benchmarks/hierarchy_scale.py``'s probe, in this process, at 256 latents."""
    row = benchmark("hierarchy_scale").probe(d_sae=256, n_batches=10, batch=4096, noise=3)
    assert row["tokens"] == 40_960 and row["planted_edges"] == 32
    assert row["precision"] >= 0.9 and row["recall"] >= 0.9, row
    assert row["most_tracked_pairs"] <= 256 * 32
