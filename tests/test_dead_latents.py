"""The dead-latent aux loss's two picks give one loss; the step takes the cheaper one.

``kernels.selection.dead_latent_pick`` picks each token's most active dead
latents either by gathering the dead latents' columns (cheap when few are
dead) or by ranking every column in place and dropping the live ones among the
candidates (cheap when nearly all are), from the count of dead latents the
step reads anyway. Forced either way, a step must give the same loss and
gradients, on both training paths, for every activation and aux-loss form,
whole-SAE or per level, at any dead fraction, and the same as SAELens's own
SAEs; neither pick may add a host read, nor copy the dead columns whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepOutput

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, step
from sae_lens_matryoshka.kernels import selection
from sae_lens_matryoshka.kernels.selection import (
    MASKED_PICK_FROM,
    DeadLatentPick,
    GatheredDeadLatents,
    MaskedDeadLatents,
    dead_latent_pick,
)
from sae_lens_matryoshka.toy import single_thread

from .conftest import step_input, train_step
from .test_oracle import _assert_same, _copy_params, _pair
from .test_training_core import ONE_READ, LargeTensors, counted_host_syncs

D_IN, D_SAE, N_TOKENS = 16, 64, 32
WIDTHS = [8, 24, D_SAE]
#: dead fractions: none, a few latents, half, 95%, all
DEAD_COUNTS = [0, 3, 32, 61, D_SAE]
#: the two picks, forced: ``masked_from`` 0 always masks, infinity always gathers
FORCED = {"masked": 0.0, "gathered": math.inf}
KINDS = {"masked": MaskedDeadLatents, "gathered": GatheredDeadLatents}
#: every activation on every path it trains on (jumprelu and relu are dense only)
PATHS = [
    ("batchtopk", "sparse"),
    ("batchtopk", "dense"),
    ("topk", "sparse"),
    ("topk", "dense"),
    ("jumprelu", "dense"),
    ("relu", "dense"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every tensor here is tiny: intra-op threads only add synchronisation (10x on 2 busy cores)."""
    with single_thread():
        yield


def _dead(n_dead: int, d_sae: int = D_SAE) -> torch.Tensor:
    """``n_dead`` latents dead, spread over the dictionary (a fixed random choice)."""
    order = torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[order[:n_dead]] = True
    return dead


def _forced(monkeypatch: pytest.MonkeyPatch, pick: str) -> list[type]:
    """Make every step pick ``pick``'s way; returns the kinds of the picks it then makes."""
    chosen: list[type] = []

    def forced(dead: torch.Tensor, start: int, n_dead: int) -> DeadLatentPick:
        made = dead_latent_pick(dead, start, n_dead, FORCED[pick])
        chosen.append(type(made))
        return made

    monkeypatch.setattr(step, "dead_latent_pick", forced)
    return chosen


def _sae(
    activation: str, training_path: str, aux_loss_form: str, per_level: bool
) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        matryoshka_widths=WIDTHS,
        activation=activation,
        **({"k": 4} if activation in ("batchtopk", "topk") else {}),
        training_path=training_path,
        aux_loss_form=aux_loss_form,
        use_matryoshka_aux_loss=per_level,
        dtype="float64",
    )
    sae = MatryoshkaTrainingSAE(cfg)
    with torch.no_grad():  # varied decoder norms, so that rescaling matters
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=torch.float64) + 0.5)
    return sae


def _step(sae: MatryoshkaTrainingSAE, dead: torch.Tensor) -> TrainStepOutput:
    x = torch.randn(N_TOKENS, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return train_step(sae, x + 0.3, dead, l1=1.0, l0=1.0)


@pytest.mark.parametrize("n_dead", DEAD_COUNTS)
@pytest.mark.parametrize("per_level", [False, True])
@pytest.mark.parametrize("aux_loss_form", ["saelens", "dictionary_learning"])
@pytest.mark.parametrize(("activation", "training_path"), PATHS)
def test_both_picks_give_the_same_loss_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
    activation: str,
    training_path: str,
    aux_loss_form: str,
    per_level: bool,
    n_dead: int,
) -> None:
    dead = _dead(n_dead)
    results = {}
    for pick in FORCED:
        chosen = _forced(monkeypatch, pick)
        sae = _sae(activation, training_path, aux_loss_form, per_level)
        out = _step(sae, dead)
        assert set(chosen) <= {KINDS[pick]} and bool(chosen) == (n_dead > 0)
        grads = {name: param.grad for name, param in sae.named_parameters()}
        results[pick] = out, grads
    (masked, masked_grads), (gathered, gathered_grads) = results["masked"], results["gathered"]
    aux = masked.losses["auxiliary_reconstruction_loss"]
    assert (float(aux.detach()) > 0) == (n_dead > 0)  # the comparison covers a loss that is there
    assert masked.losses.keys() == gathered.losses.keys()
    for name, value in gathered.losses.items():
        torch.testing.assert_close(masked.losses[name], value, msg=name)
    for name, grad in gathered_grads.items():
        torch.testing.assert_close(masked_grads[name], grad, msg=name)


@pytest.mark.parametrize("pick", list(FORCED))
@pytest.mark.parametrize("n_dead", [46, 48])  # 95%, all
@pytest.mark.parametrize("per_level", [False, True])
@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_both_picks_equal_saelens_matryoshka_when_nearly_all_are_dead(
    monkeypatch: pytest.MonkeyPatch, training_path: str, per_level: bool, n_dead: int, pick: str
) -> None:
    """SAELens's own Matryoshka BatchTopK SAE, equal weights: an independent oracle."""
    chosen = _forced(monkeypatch, pick)
    ours, ref = _pair([6, 18, 48], use_matryoshka_aux_loss=per_level, training_path=training_path)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(3)) * 2 + 0.3
    dead = _dead(n_dead, 48)
    _assert_same(train_step(ours, x, dead), train_step(ref, x, dead), ours, ref)
    assert chosen and set(chosen) == {KINDS[pick]}


@pytest.mark.parametrize("pick", list(FORCED))
def test_both_picks_equal_saelens_batchtopk_when_nearly_all_are_dead(
    monkeypatch: pytest.MonkeyPatch, pick: str
) -> None:
    chosen = _forced(monkeypatch, pick)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="only one level"):
        cfg = MatryoshkaTrainingSAEConfig(d_in=12, d_sae=48, k=3, matryoshka_widths=[48])
    ours = MatryoshkaTrainingSAE(cfg)
    ref = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=12, d_sae=48, k=3))
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    _copy_params(ours, ref)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
    dead = _dead(46, 48)
    _assert_same(train_step(ours, x, dead), train_step(ref, x, dead), ours, ref)
    assert set(chosen) == {KINDS[pick]}


def test_the_step_picks_by_how_many_are_dead() -> None:
    """Gathered below ``MASKED_PICK_FROM`` of a range dead, masked from there on."""
    width = 1000
    below, above = math.floor(MASKED_PICK_FROM * width) - 1, math.ceil(MASKED_PICK_FROM * width)
    for n_dead, kind in [(1, GatheredDeadLatents), (below, GatheredDeadLatents)]:
        assert isinstance(dead_latent_pick(_dead(n_dead, width), 0, n_dead), kind)
    for n_dead in (above, width):
        assert isinstance(dead_latent_pick(_dead(n_dead, width), 0, n_dead), MaskedDeadLatents)


def _expected(hidden_pre: torch.Tensor, dead: torch.Tensor, n_pick: int) -> set[tuple[int, int]]:
    """A masked top-k over the whole matrix (sparsify's AuxK): what both picks must select."""
    top = torch.where(dead, hidden_pre, -torch.inf).topk(n_pick, dim=-1).indices
    return {(t, int(j)) for t in range(hidden_pre.shape[0]) for j in top[t]}


def _shard_picks(
    pick: DeadLatentPick, hidden_pre: torch.Tensor, n_pick: int, bounds: list[int]
) -> Iterator[tuple[int, int]]:
    """What latent shards between ``bounds`` pick together, cut per token as ``mesh`` does."""
    offered = []
    for start, stop in itertools.pairwise(bounds):
        values, latents = pick.within(start, stop).top(hidden_pre[:, start:stop], n_pick)
        assert values.shape[-1] <= n_pick
        padded = values.new_full((values.shape[0], n_pick), -torch.inf)
        padded[:, : values.shape[-1]] = values
        offered.append((padded, values, latents + start))
    every = torch.cat([padded for padded, _, _ in offered], dim=-1)
    cut = every.topk(n_pick, dim=-1).values[:, -1:]
    for _, values, latents in offered:
        keep = (values >= cut) & torch.isfinite(values)
        for token, position in keep.nonzero().tolist():
            yield token, int(latents[token, position])


@pytest.mark.parametrize("n_dead", [1, 7, 100, 190, 200])
@pytest.mark.parametrize("pick", list(FORCED))
def test_a_pick_by_blocks_and_by_shards_selects_a_masked_topk(
    monkeypatch: pytest.MonkeyPatch, pick: str, n_dead: int
) -> None:
    """Over blocks of tokens, over shards (one holding none of the range), of a range of latents."""
    monkeypatch.setattr(selection, "_DEAD_BLOCK_ELEMENTS", 64)  # blocks of a few tokens
    hidden_pre = torch.randn(30, 260, generator=torch.Generator().manual_seed(4))
    start = 40  # the range [40, 240): a level group
    in_range = _dead(n_dead, 200)
    dead = torch.zeros(260, dtype=torch.bool)
    dead[start : start + 200] = in_range
    n_pick = min(8, n_dead)
    made = dead_latent_pick(in_range, start, n_dead, FORCED[pick])
    assert isinstance(made, KINDS[pick])
    expected = _expected(hidden_pre, dead, n_pick)
    values, latents = made.top(hidden_pre, n_pick)
    assert values.shape == latents.shape == (30, n_pick)
    assert {(t, int(j)) for t in range(30) for j in latents[t]} == expected
    torch.testing.assert_close(values, hidden_pre.gather(-1, latents))
    for bounds in ([0, 130, 260], [0, 30, 100, 170, 260]):
        assert sorted(_shard_picks(made, hidden_pre, n_pick, bounds)) == sorted(expected)


@pytest.mark.parametrize("pick", list(FORCED))
@pytest.mark.parametrize("per_level", [False, True])
def test_neither_pick_adds_a_host_read(
    monkeypatch: pytest.MonkeyPatch, pick: str, per_level: bool
) -> None:
    """One read for the dead counts of every level group, whichever way they are picked."""
    chosen = _forced(monkeypatch, pick)
    sae = _sae("batchtopk", "sparse", "saelens", per_level)
    dead = _dead(61)
    _step(sae, dead)  # the first step initialises b_dec
    x = torch.randn(N_TOKENS, D_IN, dtype=torch.float64)
    with counted_host_syncs() as syncs:
        out = sae.training_forward_pass(step_input(x, dead, logging=False, step=1))
        out.loss.backward()
    assert syncs == ONE_READ
    assert set(chosen) == {KINDS[pick]}


@pytest.mark.parametrize("pick", list(FORCED))
def test_neither_pick_copies_the_dead_columns_whole(
    monkeypatch: pytest.MonkeyPatch, pick: str
) -> None:
    """With many dead, a sparse step's only large float tensor stays the pre-activations.

    The gathered pick copies the dead columns a block of tokens at a time
    (blocks made small here), the masked one ranks the pre-activations in place.
    """
    monkeypatch.setattr(selection, "_DEAD_BLOCK_ELEMENTS", 1 << 14)
    chosen = _forced(monkeypatch, pick)
    n_tokens, d_sae = 128, 1024
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=4, matryoshka_widths=[64, 256, d_sae])
    )
    recorder = LargeTensors(n_tokens * d_sae // 4)
    with recorder:
        train_step(sae, torch.randn(n_tokens, D_IN), _dead(int(0.95 * d_sae), d_sae))
    assert [shape for _, shape in recorder.shapes] == [(n_tokens, d_sae)], recorder.shapes
    assert set(chosen) == {KINDS[pick]}
