"""BatchTopK's host-read-free selection, a measured kernel: every candidate held to the same answer.

``kernels.selection.BATCH_TOPK_SELECTION`` picks, per shape and machine, the
faster of the sampled-threshold selection and one ``topk`` over the whole
matrix; a run may use either, so each is pinned in turn
(``SAE_MATRYOSHKA_KERNELS``) and checked against an independent dense oracle
(``torch.topk`` over the flattened matrix, positive values only), in float32
and bfloat16, including batches with fewer positive entries than BatchTopK
keeps (the selection must say it ``missed``, and the step then selects again
on the host and equals an exact step). Each reads nothing back to the host
and makes every tensor on the device; a whole training step with each
equals the dense path and reads from the device once (the step's own read,
no more). Unpinned, the kernel times both on the first call and keeps its
choice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, collectives
from sae_lens_matryoshka.kernels import measured, selection
from sae_lens_matryoshka.kernels.measured import CACHE_ENV
from sae_lens_matryoshka.kernels.selection import (
    BATCH_TOPK_SELECTION,
    Selection,
    batch_topk_selection,
)

from .conftest import pin_kernel, step_input, train_step
from .fake_device import on_fake_device
from .test_sparse_path import BATCH_TOPK_CASES
from .test_training_core import ONE_READ, counted_host_syncs

CANDIDATES = sorted(BATCH_TOPK_SELECTION.candidates)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_choice_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel keeps each key's choice for the process: every test starts with none, and restores."""
    monkeypatch.setattr(BATCH_TOPK_SELECTION, "chosen", {})


def pin(monkeypatch: pytest.MonkeyPatch, candidate: str | None) -> None:
    """Pin the selection's candidate (None: measure it); the suite's other pins stay."""
    pin_kernel(monkeypatch, BATCH_TOPK_SELECTION.name, candidate)


def oracle(hidden_pre: torch.Tensor, n_keep: int) -> tuple[set[tuple[int, int]], torch.Tensor]:
    """The dense answer: the positive ones of the flattened matrix's ``n_keep`` largest.

    Their ``(token, latent)`` set and their values, sorted.
    """
    top = hidden_pre.flatten().topk(n_keep)
    positive = top.values > 0
    positions, values = top.indices[positive], top.values[positive]
    d_sae = hidden_pre.shape[1]
    entries = set(zip((positions // d_sae).tolist(), (positions % d_sae).tolist(), strict=True))
    return entries, values.sort().values


def assert_token_major(got: Selection, d_sae: int) -> None:
    """Tokens non-decreasing, latents increasing within a token: the flat positions increase."""
    flat = got.token * d_sae + got.latent
    assert bool((flat[1:] > flat[:-1]).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("case", list(BATCH_TOPK_CASES))
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_each_candidate_keeps_the_dense_topk_or_says_it_missed(
    monkeypatch: pytest.MonkeyPatch, candidate: str, case: str, dtype: torch.dtype
) -> None:
    """The oracle's entries, token-major, static in size; ``missed`` exactly when too few are positive.

    bfloat16 values tie at the cut-off (8 bits of mantissa), where a dense
    top-k and each candidate may keep different tied entries: there the
    kept values are compared, with the entries above the cut-off.
    """
    pin(monkeypatch, candidate)
    make, k = BATCH_TOPK_CASES[case]
    hidden_pre = make(torch.Generator().manual_seed(0)).to(dtype)
    n_keep = int(k * hidden_pre.shape[0])
    ran: list[str] = []
    for name, function in BATCH_TOPK_SELECTION.candidates.items():
        monkeypatch.setitem(BATCH_TOPK_SELECTION.candidates, name, _spy(name, function, ran))
    got = batch_topk_selection(hidden_pre, n_keep)
    assert ran == [candidate]
    assert got.token.shape == got.latent.shape == (n_keep,)  # static, whatever the data
    assert got.missed is not None and got.missed.shape == ()
    n_positive = int((hidden_pre > 0).sum())
    assert bool(got.missed) == (n_positive < n_keep)
    if got.missed:
        return  # the step selects again (test_a_step_whose_candidate_missed_selects_again)
    assert_token_major(got, hidden_pre.shape[1])
    entries, values = oracle(hidden_pre, n_keep)
    kept = hidden_pre[got.token, got.latent]
    assert torch.equal(kept.sort().values, values)
    if dtype == torch.float32:  # no ties in these draws
        assert set(zip(got.token.tolist(), got.latent.tolist(), strict=True)) == entries
    else:
        cutoff = values[0]
        above = {(t, j) for t, j in entries if hidden_pre[t, j] > cutoff}
        assert above <= set(zip(got.token.tolist(), got.latent.tolist(), strict=True))


def _spy(name: str, function: Callable[..., Selection], ran: list[str]) -> Callable[..., Selection]:
    def spied(*args: Any) -> Selection:
        ran.append(name)
        return function(*args)

    return spied


@pytest.mark.parametrize("selector", ["exact", *CANDIDATES])
def test_ties_at_the_cutoff_never_push_out_larger_values_after_them(
    monkeypatch: pytest.MonkeyPatch, selector: str
) -> None:
    """1,000 tied values first, 10 larger ones last, 500 kept: the 10, then the first 490 ties.

    What bfloat16 pre-activations do in most batches: the first ``n_keep``
    entries at or above the cut-off would be all ties, the larger values lost.
    """
    hidden_pre = torch.full((96, 8192), -1.0, dtype=torch.bfloat16)
    hidden_pre[0, :1000] = 1.0
    hidden_pre[95, -10:] = 2.0
    if selector == "exact":
        got = selection.batch_topk_entries(hidden_pre, 500)
    else:
        pin(monkeypatch, selector)
        got = batch_topk_selection(hidden_pre, 500)
        assert got.missed is not None and not got.missed
    kept = set(zip(got.token.tolist(), got.latent.tolist(), strict=True))
    assert len(got.token) == 500 and {(95, 8192 - j) for j in range(1, 11)} <= kept
    if selector != "topk":  # a dense topk breaks ties arbitrarily, these by position
        assert {(0, j) for j in range(490)} <= kept
    assert_token_major(got, 8192)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_the_candidates_keep_the_same_entries(
    monkeypatch: pytest.MonkeyPatch, candidate: str
) -> None:
    """At the size of a real step's selection (fewer tokens): position for position, in float32."""
    hidden_pre = torch.randn(256, 4096, generator=torch.Generator().manual_seed(3))
    n_keep = 32 * 256
    pin(monkeypatch, candidate)
    got = batch_topk_selection(hidden_pre, n_keep)
    exact = selection.batch_topk_entries(hidden_pre, n_keep)
    assert got.missed is not None and not got.missed
    assert torch.equal(got.token, exact.token) and torch.equal(got.latent, exact.latent)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_each_candidate_reads_nothing_back_to_the_host(
    monkeypatch: pytest.MonkeyPatch, candidate: str
) -> None:
    """Counted as a GPU would wait: no size read, no value read (``missed`` stays on the device)."""
    pin(monkeypatch, candidate)
    for shift in (0.0, -3.0):  # enough positives, and too few (a miss is flagged, not read)
        hidden_pre = torch.randn(96, 8192, generator=torch.Generator().manual_seed(1)) + shift
        batch_topk_selection(hidden_pre, 16 * 96)  # the first call: its sample positions cached
        with counted_host_syncs() as syncs:
            got = batch_topk_selection(hidden_pre, 16 * 96)
        assert syncs == []
        assert got.missed is not None and bool(got.missed) == (shift < 0)


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_each_candidate_selects_on_the_device_and_copies_nothing_to_it(
    monkeypatch: pytest.MonkeyPatch, candidate: str
) -> None:
    """On the stand-in accelerator of ``fake_device``: every tensor made on it, the same entries."""
    pin(monkeypatch, candidate)
    hidden_pre = torch.randn(96, 8192, generator=torch.Generator().manual_seed(2))
    expected = batch_topk_selection(hidden_pre, 8 * 96)
    selection._sample_positions.cache_clear()  # drawn again, on the device
    try:
        with on_fake_device() as seen:
            on_device = hidden_pre.to("meta")
            seen.host_to_device.clear()  # the input's own copy
            got = batch_topk_selection(on_device, 8 * 96)
        assert seen.host_to_device == []
        assert got.token.device == got.latent.device == on_device.device
        assert got.missed is not None and got.missed.device == on_device.device
        assert torch.equal(got.token.cpu(), expected.token)
        assert torch.equal(got.latent.cpu(), expected.latent)
    finally:
        selection._sample_positions.cache_clear()


D_IN = 12

#: step configurations whose selections differ in kind: the sampled threshold runs (2048
#: latents x 64 tokens), or every positive entry is ranked (64 latents), fractional k
STEPS: dict[str, dict[str, Any]] = {
    "sampled-threshold": {"d_sae": 2048, "matryoshka_widths": [16, 256, 2048]},
    "every-positive-ranked": {"d_sae": 64, "matryoshka_widths": [4, 20, 64]},
    "fractional-k": {"d_sae": 2048, "matryoshka_widths": [16, 256, 2048], "k": 2.5},
}


def _sae(training_path: str, b_enc_shift: float = 0.0, **fields: Any) -> MatryoshkaTrainingSAE:
    """A float64 SAE with random weights (the same for both paths); ``b_enc`` shifted."""
    base: dict[str, Any] = {"d_in": D_IN, "k": 5, "dtype": "float64"}
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(training_path=training_path, **{**base, **fields})  # type: ignore[arg-type]
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        sae.b_enc.add_(b_enc_shift)
    return sae


def _assert_steps_equal(
    sparse: MatryoshkaTrainingSAE,
    dense: MatryoshkaTrainingSAE,
    x: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> list[Selection]:
    """A sparse and a dense step equal; returns the exact selections the sparse step made.

    The dense path selects exactly (``batch_topk_entries``, reading counts):
    only the sparse step's are recorded.
    """
    dead = torch.arange(sparse.cfg.d_sae) % 3 == 0
    dense_out = train_step(dense, x, dead)
    exact: list[Selection] = []
    with monkeypatch.context() as patched:
        patched.setattr(collectives, "batch_topk_entries", _recording(exact))
        sparse_out = train_step(sparse, x, dead)
    assert sparse_out.losses.keys() == dense_out.losses.keys()
    for name, value in dense_out.losses.items():
        torch.testing.assert_close(sparse_out.losses[name], value, msg=name)
    torch.testing.assert_close(sparse_out.feature_acts.to_dense(), dense_out.feature_acts)
    dense_params = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, dense_params[name].grad, msg=name)
    torch.testing.assert_close(sparse.activation_fn.last_cutoff, dense.activation_fn.last_cutoff)
    return exact


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_a_training_step_with_each_candidate_equals_the_dense_path(
    monkeypatch: pytest.MonkeyPatch, candidate: str, step: str
) -> None:
    """Every loss term and every gradient, with the candidate's selection (which did not miss)."""
    pin(monkeypatch, candidate)
    sparse, dense = (_sae(path, **STEPS[step]) for path in ("sparse", "dense"))
    x = torch.randn(64, D_IN, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    ran: list[str] = []
    for name, function in BATCH_TOPK_SELECTION.candidates.items():
        monkeypatch.setitem(BATCH_TOPK_SELECTION.candidates, name, _spy(name, function, ran))
    exact = _assert_steps_equal(sparse, dense, x * 2 + 0.3, monkeypatch)
    assert ran == [candidate]
    assert exact == []  # the candidate's selection was used: nothing selected again


def _recording(calls: list[Selection]) -> Callable[[torch.Tensor, int], Selection]:
    def exact(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
        calls.append(result := selection.batch_topk_entries(hidden_pre, n_keep))
        return result

    return exact


@pytest.mark.parametrize("step", ["sampled-threshold", "every-positive-ranked"])
@pytest.mark.parametrize("candidate", CANDIDATES)
def test_a_step_whose_candidate_missed_selects_again_and_equals_the_dense_path(
    monkeypatch: pytest.MonkeyPatch, candidate: str, step: str
) -> None:
    """Fewer positive pre-activations than BatchTopK keeps: flagged, selected again on the host.

    ``b_enc`` far below zero leaves 184 of the 2048-latent batch's positive
    (10 of the 64-latent one's) against the 5 x 64 kept; the dense path keeps
    the same (its zeros add nothing).
    """
    pin(monkeypatch, candidate)
    sparse, dense = (_sae(path, b_enc_shift=-12.0, **STEPS[step]) for path in ("sparse", "dense"))
    x = torch.randn(64, D_IN, dtype=torch.double, generator=torch.Generator().manual_seed(4))
    missed: list[bool] = []
    chosen = BATCH_TOPK_SELECTION.candidates[candidate]

    def flagged(hidden_pre: torch.Tensor, n_keep: int) -> Selection:
        got = chosen(hidden_pre, n_keep)
        assert got.missed is not None
        missed.append(bool(got.missed))
        return got

    monkeypatch.setitem(BATCH_TOPK_SELECTION.candidates, candidate, flagged)
    exact = _assert_steps_equal(sparse, dense, x * 2 + 0.3, monkeypatch)
    assert missed == [True]
    assert len(exact) == 1 and 0 < len(exact[0].token) < 5 * 64


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_a_bfloat16_autocast_step_with_each_candidate_stays_close_to_the_dense_path(
    monkeypatch: pytest.MonkeyPatch, candidate: str
) -> None:
    """bfloat16 pre-activations (autocast): ties at the cut-off may keep other entries, of equal value."""
    pin(monkeypatch, candidate)
    outs = {}
    for path in ("dense", "sparse"):
        sae = _sae(path, dtype="float32", **STEPS["sampled-threshold"])
        x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[path] = (train_step(sae, x, torch.arange(2048) % 4 == 0), sae)
    (dense_out, dense), (sparse_out, sparse) = outs["dense"], outs["sparse"]
    assert sparse_out.hidden_pre.dtype == torch.bfloat16
    torch.testing.assert_close(sparse_out.loss, dense_out.loss, rtol=2e-2, atol=1e-2)
    for (name, have), want in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert have.grad is not None and want.grad is not None, name
        similarity = torch.nn.functional.cosine_similarity(
            have.grad.flatten(), want.grad.flatten(), dim=0
        )
        assert similarity > 0.99, name


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_a_steady_step_with_each_candidate_reads_from_the_device_once(
    monkeypatch: pytest.MonkeyPatch, candidate: str
) -> None:
    """The step's one read carries ``missed`` with its other numbers: the candidate adds none."""
    pin(monkeypatch, candidate)
    sae = _sae("sparse", dtype="float32", **STEPS["sampled-threshold"])
    x = torch.randn(64, D_IN)
    dead = torch.arange(2048) % 5 == 0
    train_step(sae, x, dead)  # the first step initialises b_dec, caches plans
    with counted_host_syncs() as syncs:
        out = sae.training_forward_pass(step_input(x, dead, logging=False, step=1))
        out.loss.backward()
    assert syncs == ONE_READ


def test_unpinned_the_kernel_times_both_candidates_and_keeps_the_faster(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first call for a shape measures, records the choice on disk, and answers correctly."""
    pin(monkeypatch, None)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    hidden_pre = torch.randn(96, 8192, generator=torch.Generator().manual_seed(6))
    n_keep = 8 * 96
    got = batch_topk_selection(hidden_pre, n_keep)
    key = ((96, 8192), n_keep, torch.float32, hidden_pre.device)
    assert BATCH_TOPK_SELECTION.chosen.keys() == {key}
    choice = BATCH_TOPK_SELECTION.chosen[key]
    assert choice in CANDIDATES
    (entry,) = tmp_path.iterdir()
    recorded = json.loads(entry.read_text())
    assert recorded["kernel"] == "batch_topk_selection" and recorded["choice"] == choice
    assert recorded["measured_ms"].keys() == set(CANDIDATES)
    assert measured.choices()["batch_topk_selection"] == {measured._describe(key): choice}
    assert got.missed is not None and not got.missed
    entries, _ = oracle(hidden_pre, n_keep)
    assert set(zip(got.token.tolist(), got.latent.tolist(), strict=True)) == entries
    # the next call, and another process's kernel, use that choice without timing again
    monkeypatch.setattr(measured, "_time", _no_timing)
    batch_topk_selection(hidden_pre, n_keep)
    monkeypatch.setattr(BATCH_TOPK_SELECTION, "chosen", {})  # as a new process
    batch_topk_selection(hidden_pre, n_keep)
    assert BATCH_TOPK_SELECTION.chosen == {key: choice}


def _no_timing(*_: Any) -> float:
    raise AssertionError("a kept choice is not timed again")
