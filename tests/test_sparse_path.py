"""The sparse training path against dense references.

Selection is compared with dense ``topk`` over the whole matrix; the sparse
encoder backward with ``gradcheck`` and with autograd through dense matmuls; the
sparse decode with the dense cumulative decode; and whole training steps,
including every loss term and every gradient, with ``training_path="dense"``
for the same parameters, for every level configuration.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.collectives import SINGLE_PROCESS
from sae_lens_matryoshka.kernels import encoder_backward, measured, selection
from sae_lens_matryoshka.kernels.encoder_backward import (
    ENCODER_WEIGHT_GRAD,
    EncoderEntries,
    EntryOrder,
    LaterEncoderValues,
    SparseEncoderValues,
    bagged_weight_grad,
    csr_weight_grad,
    encoder_weight_grad,
    latent_major_order,
    row_starts,
)
from sae_lens_matryoshka.kernels.entry_sets import LaterGradients
from sae_lens_matryoshka.kernels.level_decode import RunningLevels, decode_groups, decode_levels
from sae_lens_matryoshka.kernels.measured import CACHE_ENV, CHOICE_ENV, MeasuredKernel
from sae_lens_matryoshka.kernels.selection import (
    batch_topk_entries,
    dead_latent_pick,
    sampled_batch_topk_entries,
    topk_entries,
)

from .conftest import new_empty_filled_with_nan, pin_kernel, step_output, train_step

D_IN, D_SAE = 12, 64


def dense_batch_topk(hidden_pre: torch.Tensor, k: float) -> torch.Tensor:
    """The reference: the ``k * n_tokens`` largest values of the ReLU'd matrix, by a full top-k."""
    acts = hidden_pre.relu().flatten()
    top = acts.topk(int(k * hidden_pre.shape[0]))
    return torch.zeros_like(acts).scatter(0, top.indices, top.values).view_as(hidden_pre)


def dense_topk(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: each row's ``k`` largest values, then ReLU."""
    top = hidden_pre.topk(k, dim=-1)
    return torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())


def _selected_set(token: torch.Tensor, latent: torch.Tensor) -> set[tuple[int, int]]:
    return set(zip(token.tolist(), latent.tolist(), strict=True))


def _dense_set(acts: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(t), int(j)) for t, j in acts.nonzero().tolist()}


def _assert_token_major(token: torch.Tensor, latent: torch.Tensor, d_sae: int) -> None:
    """Tokens non-decreasing and latents increasing within a token: the flat index increases."""
    flat = token * d_sae + latent
    assert bool((flat[1:] > flat[:-1]).all())


# 96 x 8192 is large enough for the sampled threshold (not just a rank of all positives)
BATCH_TOPK_CASES = {
    "large-random": (lambda g: torch.randn(96, 8192, generator=g), 40),
    "large-fractional-k": (lambda g: torch.randn(96, 8192, generator=g) - 1, 7.5),
    "large-shifted-negative": (lambda g: torch.randn(96, 8192, generator=g) - 3.5, 16),
    "small": (lambda g: torch.randn(10, 50, generator=g), 4),
    "fewer-positives-than-k": (lambda g: torch.randn(10, 50, generator=g) - 2.5, 8),
    "k-equals-d_sae": (lambda g: torch.randn(10, 50, generator=g), 50),
    "no-positives": (lambda g: -torch.rand(10, 50, generator=g), 3),
}


@pytest.mark.parametrize("case", list(BATCH_TOPK_CASES))
def test_batch_topk_selection_equals_a_dense_topk(case: str) -> None:
    make, k = BATCH_TOPK_CASES[case]
    hidden_pre = make(torch.Generator().manual_seed(0))
    token, latent, _ = batch_topk_entries(hidden_pre, int(k * hidden_pre.shape[0]))
    assert _selected_set(token, latent) == _dense_set(dense_batch_topk(hidden_pre, k))
    _assert_token_major(token, latent, hidden_pre.shape[1])


@pytest.mark.parametrize("case", list(BATCH_TOPK_CASES))
def test_the_sampled_selection_is_exact_or_says_it_missed(case: str) -> None:
    """Without a host read: the exact entries, or ``missed`` where it cannot know them.

    It misses exactly where fewer entries are positive than BatchTopK keeps
    (the answer's size then depends on the data); with these sizes the
    threshold's estimate never falls outside the candidate buffer.
    """
    make, k = BATCH_TOPK_CASES[case]
    hidden_pre = make(torch.Generator().manual_seed(0))
    n_keep = int(k * hidden_pre.shape[0])
    sampled = sampled_batch_topk_entries(hidden_pre, n_keep)
    assert sampled.missed is not None
    assert bool(sampled.missed) == (int((hidden_pre > 0).sum()) < n_keep)
    assert sampled.token.shape == sampled.latent.shape == (n_keep,)  # static, whatever the data
    if not sampled.missed:
        exact = batch_topk_entries(hidden_pre, n_keep)
        assert torch.equal(sampled.token, exact.token)
        assert torch.equal(sampled.latent, exact.latent)


def test_the_sampled_selection_misses_when_more_pass_than_it_has_room_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threshold far below its aim: more candidates than the buffer holds is a miss."""
    hidden_pre = torch.randn(96, 8192, generator=torch.Generator().manual_seed(0))
    n_keep = 8 * 96
    assert not sampled_batch_topk_entries(hidden_pre, n_keep).missed
    monkeypatch.setattr(selection, "_candidate_threshold", lambda flat, n_keep: 0.0)
    missed = sampled_batch_topk_entries(hidden_pre, n_keep)
    assert missed.missed
    # whatever it missed, its entries are valid and token-major: the step decodes them
    _assert_token_major(missed.token, missed.latent, 8192)


@pytest.mark.parametrize("estimate", ["too-high", "too-low"])
def test_a_step_whose_selection_missed_selects_again_and_equals_an_exact_step(
    monkeypatch: pytest.MonkeyPatch, estimate: str
) -> None:
    """The step reads ``missed`` with its other numbers and redoes the selection on the host."""
    cfg = MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=1024, k=4, matryoshka_widths=[64, 1024])
    torch.manual_seed(0)
    expected_sae = MatryoshkaTrainingSAE(cfg)
    missing_sae = MatryoshkaTrainingSAE(cfg)
    missing_sae.load_state_dict(expected_sae.state_dict())
    x = torch.randn(64, D_IN)
    dead = torch.arange(1024) % 7 == 0
    expected = train_step(expected_sae, x, dead)
    flat_max = float(x.abs().max()) * 1e6
    wrong = {"too-high": flat_max, "too-low": 0.0}[estimate]
    real_threshold = selection._candidate_threshold
    calls: list[bool] = []

    def off_once(flat: torch.Tensor, n_keep: int) -> torch.Tensor | float:
        calls.append(True)
        return wrong if len(calls) == 1 else real_threshold(flat, n_keep)

    monkeypatch.setattr(selection, "_candidate_threshold", off_once)
    got = train_step(missing_sae, x, dead)
    assert len(calls) == 2  # the missed estimate, then the exact selection's
    assert got.losses.keys() == expected.losses.keys()
    for name, value in expected.losses.items():
        torch.testing.assert_close(got.losses[name], value, msg=name)
    for (name, param), got_param in zip(
        expected_sae.named_parameters(), missing_sae.parameters(), strict=True
    ):
        assert param.grad is not None and got_param.grad is not None
        torch.testing.assert_close(got_param.grad, param.grad, msg=name)
    torch.testing.assert_close(
        missing_sae.activation_fn.last_cutoff, expected_sae.activation_fn.last_cutoff
    )


def test_batch_topk_selection_keeps_exactly_k_per_token_when_the_cutoff_is_tied() -> None:
    """Ties at the cut-off: exactly ``n_keep`` entries, the same values as a dense top-k."""
    hidden_pre = torch.ones(96, 8192)
    hidden_pre[:, ::2] = -1.0
    hidden_pre[0, :10] = torch.arange(2.0, 12.0)  # 5 values above the tie, at even columns
    k = 4
    token, latent, _ = batch_topk_entries(hidden_pre, k * 96)
    dense = dense_batch_topk(hidden_pre, k)
    assert len(token) == int(dense.count_nonzero()) == k * 96
    torch.testing.assert_close(
        hidden_pre[token, latent].sort().values, dense[dense > 0].sort().values
    )
    assert {(0, j) for j in range(0, 10, 2)} <= _selected_set(token, latent)
    _assert_token_major(token, latent, 8192)


def test_batch_topk_selection_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    batch_topk_entries(torch.randn(96, 8192, generator=torch.Generator().manual_seed(1)), 8 * 96)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("shift", [0.0, -2.0])
def test_topk_selection_equals_a_dense_topk(shift: float) -> None:
    hidden_pre = torch.randn(30, 80, generator=torch.Generator().manual_seed(0)) + shift
    token, latent = topk_entries(hidden_pre, 6)
    assert len(token) == 30 * 6  # static shape: k per token, whatever their sign
    kept = hidden_pre[token, latent].relu()
    assert _selected_set(token[kept > 0], latent[kept > 0]) == _dense_set(dense_topk(hidden_pre, 6))
    _assert_token_major(token, latent, 80)


@pytest.mark.parametrize("masked_from", [0.0, math.inf])  # the masked pick, the gathered one
def test_dead_latent_selection_equals_a_masked_topk(masked_from: float) -> None:
    hidden_pre = torch.randn(20, 40, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(40) % 3 == 0
    pick = dead_latent_pick(dead, 0, int(dead.sum()), masked_from)
    token, latent, value = SINGLE_PROCESS.dead_topk(*pick.top(hidden_pre, 5), 5)
    assert torch.equal(value, hidden_pre[token, latent])  # the values come along, exactly
    top = torch.where(dead, hidden_pre, -torch.inf).topk(5, dim=-1).indices
    expected = {(t, int(j)) for t in range(20) for j in top[t]}
    assert _selected_set(token, latent) == expected
    assert dead[latent].all()
    assert bool((token[1:] >= token[:-1]).all())


def _encoder_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.double, generator=generator)
    shift = torch.randn(5, dtype=torch.double, generator=generator).requires_grad_()
    W_enc = torch.randn(5, 9, dtype=torch.double, generator=generator).requires_grad_()
    b_enc = torch.randn(9, dtype=torch.double, generator=generator).requires_grad_()
    return x, shift, W_enc, b_enc


# token-major entries, as every selection returns them
TOKEN = torch.tensor([0, 0, 1, 3, 3, 3, 5])
LATENT = torch.tensor([2, 7, 7, 0, 4, 8, 2])


def _sparse_values(
    x: torch.Tensor, shift: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
) -> torch.Tensor:
    """The pre-activations at the entries, computed without a graph and re-attached sparsely."""
    sae_in = (x - shift).detach()
    values = (sae_in @ W_enc + b_enc).detach()[TOKEN, LATENT]
    values, _link = SparseEncoderValues.apply(
        values, sae_in, shift, W_enc, b_enc, TOKEN, LATENT, None, LaterGradients()
    )
    return values


def test_sparse_encoder_backward_passes_gradcheck() -> None:
    x, shift, W_enc, b_enc = _encoder_inputs()
    assert torch.autograd.gradcheck(
        lambda s, w, b: _sparse_values(x, s, w, b), (shift, W_enc, b_enc)
    )


def test_sparse_encoder_gradients_equal_dense_autograd() -> None:
    x, shift, W_enc, b_enc = _encoder_inputs()
    upstream = torch.randn(len(TOKEN), dtype=torch.double)
    inputs = (shift, W_enc, b_enc)
    dense = ((x - shift) @ W_enc + b_enc)[TOKEN, LATENT]
    expected = torch.autograd.grad((dense * upstream).sum(), inputs)
    got = torch.autograd.grad((_sparse_values(x, *inputs) * upstream).sum(), inputs)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)


# a later set of entries of the same pre-activations (the dead-latent loss's), sharing latents
LATER_TOKEN = torch.tensor([0, 1, 1, 2, 4, 5, 5])
LATER_LATENT = torch.tensor([7, 3, 7, 1, 4, 2, 6])


@pytest.mark.parametrize("reached", ["both", "first", "later"])
def test_a_later_set_of_entries_joins_the_first_sets_backward(reached: str) -> None:
    """One backward for both sets equals dense autograd of both, whichever losses the pass reaches.

    The later set's gradients reach ``W_enc``, ``b_enc`` and the shift through
    the first set's backward (the link), also when only the later set's loss
    is differentiated; a pass that reaches only the first set computes its own.
    """
    x, shift, W_enc, b_enc = _encoder_inputs()
    inputs = (shift, W_enc, b_enc)
    generator = torch.Generator().manual_seed(3)
    up_first = torch.randn(len(TOKEN), dtype=torch.double, generator=generator)
    up_later = torch.randn(len(LATER_TOKEN), dtype=torch.double, generator=generator)
    weights = {"both": (1, 1), "first": (1, 0), "later": (0, 1)}[reached]

    dense = (x - shift) @ W_enc + b_enc
    dense_loss = weights[0] * (dense[TOKEN, LATENT] * up_first).sum()
    dense_loss = dense_loss + weights[1] * (dense[LATER_TOKEN, LATER_LATENT] * up_later).sum()
    expected = torch.autograd.grad(dense_loss, inputs)

    sae_in = (x - shift).detach()
    pre = (sae_in @ W_enc + b_enc).detach()
    later = LaterGradients[EncoderEntries]()
    first, link = SparseEncoderValues.apply(
        pre[TOKEN, LATENT], sae_in, shift, W_enc, b_enc, TOKEN, LATENT, None, later
    )
    second = LaterEncoderValues.apply(
        pre[LATER_TOKEN, LATER_LATENT], link, LATER_TOKEN, LATER_LATENT, None, later
    )
    losses = [(first * up_first).sum(), (second * up_later).sum()]
    loss = sum(loss for loss, weight in zip(losses, weights, strict=True) if weight)
    got = torch.autograd.grad(loss, inputs)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)
    assert later.take() == []  # the first set's backward took what the later one left


@pytest.mark.parametrize("kernel", sorted(ENCODER_WEIGHT_GRAD.candidates))
def test_the_encoder_gradient_of_several_sets_is_their_sum(
    monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """One call over both sets, on uninitialised memory: the sum of each set's gradient."""
    pin_kernel(monkeypatch, "encoder_weight_grad", kernel)
    generator = torch.Generator().manual_seed(4)
    sae_in = torch.randn(6, 5, generator=generator)
    sets = [
        EncoderEntries(TOKEN, LATENT, torch.randn(len(TOKEN), generator=generator)),
        EncoderEntries(
            LATER_TOKEN, LATER_LATENT, torch.randn(len(LATER_TOKEN), generator=generator)
        ),
    ]
    alone = [encoder_weight_grad(sae_in, [part], 9) for part in sets]
    with new_empty_filled_with_nan():
        both = encoder_weight_grad(sae_in, sets, 9)
    torch.testing.assert_close(both, alone[0] + alone[1])
    if (
        kernel == "bagged"
    ):  # the blocks' sums, then one copy: what adding the two gives, bit for bit
        assert torch.equal(both, alone[0] + alone[1])


@pytest.mark.parametrize("detach", [False, True])
def test_running_levels_are_the_cumulative_sum_with_its_gradients(detach: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    partials = torch.randn(7, 4, 5, dtype=torch.double, generator=generator).requires_grad_()
    b_dec = torch.randn(5, dtype=torch.double, generator=generator).requires_grad_()
    levels = RunningLevels.apply(partials, b_dec, detach)
    torch.testing.assert_close(levels, partials.cumsum(dim=1).transpose(0, 1) + b_dec)
    if not detach:
        assert torch.autograd.gradcheck(
            lambda p, b: RunningLevels.apply(p, b, False), (partials, b_dec)
        )
    else:  # a stop-gradient: each level's loss reaches only its own group (b_dec: level 0's)
        upstream = torch.zeros(4, 7, 5, dtype=torch.double)
        upstream[2] = 1.0
        grad_partials, grad_b_dec = torch.autograd.grad(
            RunningLevels.apply(partials, b_dec, detach), (partials, b_dec), upstream
        )
        assert grad_partials[:, 2].eq(1).all() and grad_partials[:, [0, 1, 3]].eq(0).all()
        assert grad_b_dec.eq(0).all()
    # low precision: summed in float32, each level rounded once
    low = RunningLevels.apply(partials.detach().bfloat16(), b_dec.detach().bfloat16(), detach)
    exact = partials.detach().bfloat16().double().cumsum(dim=1).transpose(0, 1)
    torch.testing.assert_close(low, (exact + b_dec.detach().bfloat16().double()).bfloat16())


@pytest.mark.parametrize("kernel", sorted(ENCODER_WEIGHT_GRAD.candidates))
def test_encoder_weight_gradient_is_the_dense_product(
    monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """Each candidate implementation, in float32, bfloat16 and over uninitialised memory."""
    pin_kernel(monkeypatch, "encoder_weight_grad", kernel)
    generator = torch.Generator().manual_seed(0)
    sae_in = torch.randn(6, 5, generator=generator)
    grad = torch.randn(len(TOKEN), generator=generator)
    G = torch.zeros(6, 9)
    G[TOKEN, LATENT] = grad
    torch.testing.assert_close(
        encoder_weight_grad(sae_in, [EncoderEntries(TOKEN, LATENT, grad)], 9), sae_in.T @ G
    )
    # whatever memory the result is written over held (NaN here) is ignored
    with new_empty_filled_with_nan():
        got = encoder_weight_grad(sae_in, [EncoderEntries(TOKEN, LATENT, grad)], 9)
    torch.testing.assert_close(got, sae_in.T @ G)
    # bfloat16 inputs are multiplied in float32 (no bfloat16 sparse kernel on CPU)
    low = encoder_weight_grad(
        sae_in.bfloat16(), [EncoderEntries(TOKEN, LATENT, grad.bfloat16())], 9
    )
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sae_in.T @ G, rtol=2e-2, atol=2e-2)
    # and at a size with many entries per token, as the dead-latent loss has
    token, latent = topk_entries(torch.randn(64, 512, generator=generator), 100)
    grad = torch.randn(len(token), generator=generator)
    sae_in = torch.randn(64, 24, generator=generator)
    G = torch.zeros(64, 512)
    G[token, latent] = grad
    got = encoder_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], 512)
    torch.testing.assert_close(got, sae_in.T @ G, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 2, 4, 7, 9, 64])
def test_the_bagged_encoder_gradient_in_blocks_is_the_same_sums(
    monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Blocks of latents on CPU: one or several, a last one shorter, and blocks without entries.

    Latents 0 and 4-6 have no entry here; the sums are the one-block result bit for bit.
    """
    generator = torch.Generator().manual_seed(1)
    token = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])
    latent = torch.tensor([1, 7, 3, 2, 8, 3, 7, 8])
    grad = torch.randn(len(token), generator=generator)
    sae_in = torch.randn(6, 5, generator=generator)
    G = torch.zeros(6, 9)
    G[token, latent] = grad
    monkeypatch.setattr(encoder_backward, "BAG_BLOCK", 9)
    whole = bagged_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], _nan_out(5, 9))
    monkeypatch.setattr(encoder_backward, "BAG_BLOCK", block)
    got = bagged_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], _nan_out(5, 9))
    assert torch.equal(got, whole)
    torch.testing.assert_close(got, sae_in.T @ G)


def test_a_measured_kernel_runs_the_faster_candidate_and_keeps_its_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    calls: list[str] = []

    def slow(x: torch.Tensor) -> torch.Tensor:
        calls.append("slow")
        time.sleep(0.02)
        return x + 1

    def fast(x: torch.Tensor) -> torch.Tensor:
        calls.append("fast")
        return x + 1

    kernel = MeasuredKernel("demo", {"slow": slow, "fast": fast})
    x = torch.zeros(3)
    torch.testing.assert_close(kernel("shape-a", x), x + 1)
    assert kernel.chosen == {"shape-a": "fast"}
    assert set(calls) == {"slow", "fast"}  # both timed on the first call for a key
    calls.clear()
    for _ in range(3):
        kernel("shape-a", x)
    assert calls == ["fast"] * 3  # then only the chosen one, no more timing
    kernel("shape-b", x)
    assert set(kernel.chosen) == {"shape-a", "shape-b"}  # each key measured once
    # a fixed choice: no timing, whatever was measured
    monkeypatch.setenv(CHOICE_ENV, "other=x, demo=slow")
    calls.clear()
    kernel("shape-c", x)
    assert calls == ["slow"] and "shape-c" not in kernel.chosen
    monkeypatch.setenv(CHOICE_ENV, "demo=quick")
    with pytest.raises(
        ValueError, match=r"kernel 'demo' has the candidates \['fast', 'slow'\], got 'quick'"
    ):
        kernel("shape-d", x)


def test_a_measurement_times_the_candidates_in_interleaved_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of load during one candidate's first timing does not decide: each keeps its best."""
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    monkeypatch.setattr(measured, "_ROUNDS", 2)
    candidates = {"a": lambda x: x + 1, "b": lambda x: x + 1}
    order: list[str] = []
    # a's first timing falls in a burst (5.0); its second is the fastest of all
    seconds = {"a": iter([5.0, 1.0]), "b": iter([2.0, 2.0])}

    def timed(candidate: Any, _args: Any, _device: Any) -> float:
        name = next(name for name, c in candidates.items() if c is candidate)
        order.append(name)
        return next(seconds[name])

    monkeypatch.setattr(measured, "_time", timed)
    kernel = MeasuredKernel("bursty", candidates)
    kernel("shape", torch.zeros(3))
    assert order == ["a", "b", "a", "b"]
    assert kernel.chosen == {"shape": "a"}


def test_a_measured_choice_is_kept_for_the_machine_and_read_instead_of_timing_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What makes a run repeatable: a later process uses the choice, whatever its timings say."""
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "kernels"))
    candidates = {"a": lambda x: x + 1, "b": lambda x: x + 1}
    timed: list[str] = []

    def favouring(name: str) -> Any:
        def time_it(candidate: Any, _args: Any, _device: Any) -> float:
            timed.append(name)
            return 1.0 if candidate is candidates[name] else 2.0

        return time_it

    x = torch.zeros(3)
    monkeypatch.setattr(measured, "_time", favouring("a"))
    assert MeasuredKernel("cached", candidates)(("shape", x.device), x) is not None
    (entry,) = (tmp_path / "kernels").iterdir()  # no temporary file left behind
    assert json.loads(entry.read_text())["choice"] == "a"
    # a new process, on a machine now timing "b" faster: it reads "a", times nothing
    timed.clear()
    monkeypatch.setattr(measured, "_time", favouring("b"))
    fresh = MeasuredKernel("cached", candidates)
    fresh(("shape", x.device), x)
    assert fresh.chosen == {("shape", x.device): "a"} and timed == []
    assert measured.choices()["cached"] == {"('shape', 'cpu')": "a"}
    # another shape is measured and kept apart
    fresh(("other", x.device), x)
    assert fresh.chosen[("other", x.device)] == "b" and len(list(entry.parent.iterdir())) == 2

    # another release of this package measures again (its candidates may have changed)
    with monkeypatch.context() as release:
        release.setattr(measured, "package_version", lambda: "99.0")
        released = MeasuredKernel("cached", candidates)
        released(("shape", x.device), x)
    assert released.chosen[("shape", x.device)] == "b" and len(list(entry.parent.iterdir())) == 3
    # run from a source tree, not installed: still a version to key by
    with monkeypatch.context() as source_tree:

        def not_installed(name: str) -> str:
            raise importlib.metadata.PackageNotFoundError(name)

        source_tree.setattr(importlib.metadata, "version", not_installed)
        assert measured.package_version() == "not installed"

    # a damaged entry, or one naming a candidate that no longer exists, is measured again
    entry.write_text('{"choice": "gone"}')
    again = MeasuredKernel("cached", candidates)
    again(("shape", x.device), x)
    assert again.chosen[("shape", x.device)] == "b"
    assert json.loads(entry.read_text())["choice"] == "b"

    # two processes measuring at once: the one that kept its choice first wins
    entry.unlink()

    def racing(candidate: Any, _args: Any, _device: Any) -> float:
        entry.write_text('{"choice": "a"}')  # the other process, finishing first
        return 1.0 if candidate is candidates["b"] else 2.0

    monkeypatch.setattr(measured, "_time", racing)
    loser = MeasuredKernel("cached", candidates)
    loser(("shape", x.device), x)
    assert loser.chosen[("shape", x.device)] == "a"

    # nowhere to keep it: measured and used all the same, with a warning that says so
    monkeypatch.setenv(CACHE_ENV, str(entry))  # a file, not a folder
    with caplog.at_level("WARNING", logger=measured.__name__):
        unkept = MeasuredKernel("cached", candidates)
        unkept(("shape", x.device), x)
    assert unkept.chosen[("shape", x.device)] == "b"
    assert "could not keep the choice" in caplog.text
    # an empty setting keeps nothing, and reads nothing
    monkeypatch.setenv(CACHE_ENV, "")
    assert measured.cache_folder() is None


def _nan_out(d_in: int, d_sae: int) -> torch.Tensor:
    """Memory for a ``W_enc`` gradient that a candidate must write all over (a kept one is not zero)."""
    return torch.full((d_in, d_sae), torch.nan)


def test_the_encoder_kernels_round_differently_so_a_run_must_keep_one() -> None:
    """Why the choice is kept: both candidates are right, and their last bits differ."""
    generator = torch.Generator().manual_seed(0)
    token, latent = topk_entries(torch.randn(256, 512, generator=generator), 64)
    grad = torch.randn(len(token), generator=generator)
    sae_in = torch.randn(256, 48, generator=generator)
    csr = csr_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], _nan_out(48, 512))
    bagged = bagged_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], _nan_out(48, 512))
    torch.testing.assert_close(csr, bagged)
    assert not torch.equal(csr, bagged)


@pytest.mark.parametrize("widths", [[64], [4, 20, 64], [1, 2, 63, 64]])
def test_group_decode_sums_to_the_dense_cumulative_decode(widths: list[int]) -> None:
    generator = torch.Generator().manual_seed(0)
    acts = dense_topk(torch.randn(7, 64, dtype=torch.double, generator=generator), 9)
    W_dec = torch.randn(64, 5, dtype=torch.double, generator=generator).requires_grad_()
    b_dec = torch.randn(5, dtype=torch.double, generator=generator)
    dense_acts = acts.clone().requires_grad_()
    token, latent = dense_acts.detach().nonzero().unbind(1)  # token-major, as selections give
    values = acts[token, latent].clone().requires_grad_()
    upstream = torch.randn(len(widths), 7, 5, dtype=torch.double, generator=generator)

    dense = decode_levels(dense_acts, W_dec, b_dec, widths)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (dense_acts, W_dec))
    bounds = torch.tensor(widths[:-1], dtype=torch.long)
    groups = decode_groups(values, token, latent, W_dec, 7, bounds)
    sparse = groups.cumsum(dim=1).transpose(0, 1) + b_dec
    sparse_grads = torch.autograd.grad((sparse * upstream).sum(), (values, W_dec))

    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(sparse_grads[0], dense_grads[0][token, latent])
    torch.testing.assert_close(sparse_grads[1], dense_grads[1])


#: torch's CPU sort of 1-D integers switches to a stable radix sort from this many
_RADIX_FROM = 1 << 15


def _entries(
    n_tokens: int, per_token: int, d_sae: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_token`` random distinct latents per token, token-major (latents increasing)."""
    latent = torch.stack(
        [
            torch.randperm(d_sae, generator=generator)[:per_token].sort().values
            for _ in range(n_tokens)
        ]
    )
    return torch.arange(n_tokens).repeat_interleave(per_token), latent.reshape(-1)


@pytest.mark.parametrize(
    ("n_tokens", "per_token", "d_sae"),
    [(16, 5, 64), (1024, 40, 16384), (512, 80, 40000), (64, 3, 1 << 15), (64, 3, (1 << 15) + 1)],
    ids=["small", "radix-int16-keys", "radix-int32-keys", "int16-edge", "int32-edge"],
)
def test_the_latent_major_order_is_a_stable_argsort_on_one_thread(
    n_tokens: int, per_token: int, d_sae: int
) -> None:
    """The same permutation as ``argsort(stable=True)``, whatever key type it sorts; threads restored."""
    generator = torch.Generator().manual_seed(0)
    _, latent = _entries(n_tokens, per_token, d_sae, generator)
    latent[-1] = d_sae - 1  # the largest latent must fit the narrowed key
    threads = torch.get_num_threads()
    order = latent_major_order(latent, d_sae)
    assert torch.get_num_threads() == threads
    assert order.dtype == torch.long
    assert torch.equal(order, torch.argsort(latent, stable=True))
    entry_order = EntryOrder(latent, d_sae)
    assert entry_order.order is entry_order.order  # sorted once
    counts = torch.bincount(latent, minlength=d_sae)
    assert torch.equal(
        entry_order.starts, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    )


@pytest.mark.parametrize("n_entries", [200, _RADIX_FROM + 4096], ids=["std-sort", "radix-sort"])
def test_group_decode_equals_torchs_embedding_bag_and_its_gradients(n_entries: int) -> None:
    """Forward and the values' gradient bit for bit; ``W_dec``'s too wherever torch's sort is stable.

    From 32,768 entries torch's backward sorts them with its stable radix
    sort, in the order ``EntryOrder`` sorts them: the same sums in the same
    order. Below, torch's ``std::sort`` leaves a latent's entries in an order
    of its own, and only the last bits may differ.
    """
    generator = torch.Generator().manual_seed(0)
    n_tokens = 256
    per_token = n_entries // n_tokens + 1
    token, latent = _entries(n_tokens, per_token, 2048, generator)
    W_dec = torch.randn(2048, 8, generator=generator).requires_grad_()
    values = torch.randn(len(token), generator=generator).requires_grad_()
    bounds = torch.tensor([64, 512])
    upstream = torch.randn(n_tokens, 3, 8, generator=generator)
    groups = decode_groups(values, token, latent, W_dec, n_tokens, bounds)
    assert groups.grad_fn is not None
    assert groups.grad_fn.next_functions[0][0].name() == "GroupDecodeBackward"
    bag = token * 3 + torch.bucketize(latent, bounds, right=True)
    offsets = row_starts(bag, n_tokens * 3)[:-1]
    torchs = torch.nn.functional.embedding_bag(
        latent, W_dec, offsets, mode="sum", per_sample_weights=values
    ).view(n_tokens, 3, 8)
    assert torch.equal(groups, torchs)
    ours = torch.autograd.grad((groups * upstream).sum(), (values, W_dec))
    expected = torch.autograd.grad((torchs * upstream).sum(), (values, W_dec))
    assert torch.equal(ours[0], expected[0])
    if len(token) >= _RADIX_FROM:
        assert torch.equal(ours[1], expected[1])
    torch.testing.assert_close(ours[1], expected[1])
    # a bfloat16 W_dec keeps torch's backward (it rounds every addition), bit for bit
    low = W_dec.detach().bfloat16().requires_grad_()
    low_values = values.detach().bfloat16().requires_grad_()
    ours_low = decode_groups(low_values, token, latent, low, n_tokens, bounds)
    torchs_low = torch.nn.functional.embedding_bag(
        latent, low, offsets, mode="sum", per_sample_weights=low_values
    )
    up = upstream.bfloat16()
    assert torch.equal(
        torch.autograd.grad((ours_low * up).sum(), low)[0],
        torch.autograd.grad((torchs_low.view(n_tokens, 3, 8) * up).sum(), low)[0],
    )


def test_the_csr_product_through_the_shared_order_sorts_nothing_and_equals_torchs() -> None:
    """Handed ``G``'s CSC form, torch's CPU product skips its internal sort; the result is the same."""
    generator = torch.Generator().manual_seed(0)
    token, latent = _entries(512, 70, 4096, generator)
    grad = torch.randn(len(token), generator=generator)
    sae_in = torch.randn(512, 16, generator=generator)
    csr = torch.sparse_csr_tensor(
        row_starts(token, 512), latent, grad, (512, 4096), check_invariants=False
    )
    with torch.profiler.profile() as through_csr:
        expected = sae_in.t() @ csr
    assert any(event.name == "aten::sort" for event in through_csr.events())
    order = EntryOrder(latent, 4096)
    _ = order.order, order.starts
    with torch.profiler.profile() as through_csc:
        got = csr_weight_grad(
            sae_in, [EncoderEntries(token, latent, grad, order)], _nan_out(16, 4096)
        )
    assert not [event.name for event in through_csc.events() if "sort" in event.name]
    assert torch.equal(got, expected)
    assert torch.equal(
        bagged_weight_grad(
            sae_in, [EncoderEntries(token, latent, grad, order)], _nan_out(16, 4096)
        ),
        bagged_weight_grad(sae_in, [EncoderEntries(token, latent, grad)], _nan_out(16, 4096)),
    )


@pytest.mark.parametrize("kernel", sorted(ENCODER_WEIGHT_GRAD.candidates))
@pytest.mark.parametrize("dead_fraction", [0.0, 0.5], ids=["none-dead", "half-dead"])
def test_a_sparse_step_sorts_each_set_of_entries_once(
    monkeypatch: pytest.MonkeyPatch, kernel: str, dead_fraction: float
) -> None:
    """One sort of the selected entries (and one of the dead-latent picks), shared by both gradients.

    Neither the decode's backward nor the ``W_enc`` gradient sorts on its
    own: torch's ``embedding_bag`` backward and its CSR product each sorted
    the step's entries, with a parallel radix sort that stalls on shared
    cores (see ``benchmarks/step_profile.py``).
    """
    pin_kernel(monkeypatch, "encoder_weight_grad", kernel)
    sae = _sae("sparse", dtype="float32")
    x = torch.randn(40, D_IN)
    dead = torch.arange(D_SAE) % 2 == 0 if dead_fraction else torch.zeros(D_SAE, dtype=torch.bool)
    with torch.profiler.profile() as profiled:
        train_step(sae, x, dead)
    sorts = [event for event in profiled.events() if event.name in ("aten::sort", "aten::argsort")]
    outer = [
        event for event in sorts if event.cpu_parent is None or "sort" not in event.cpu_parent.name
    ]
    assert all(event.name == "aten::argsort" for event in outer)
    assert len(outer) == (2 if dead_fraction else 1)


def _sae(training_path: str, **fields: Any) -> MatryoshkaTrainingSAE:
    base: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 5,
        "matryoshka_widths": [4, 20, 64],
        "dtype": "float64",
    }
    base.update(fields)
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(training_path=training_path, **base)  # type: ignore[arg-type]
    )
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    return sae


STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "paper-levels": {},
    "single-level": {"matryoshka_widths": [D_SAE]},
    "tiny-first-levels": {"matryoshka_widths": [1, 2, 63, 64]},
    "detach-between-levels": {"detach_between_levels": True},
    "level-weights": {"level_weights": [3.0, 0.5, 1.0]},
    "pareto-prefixes": {"prefix_sampling": "pareto", "n_sampled_prefixes": 6},
    "topk": {"activation": "topk"},
    "topk-detach": {"activation": "topk", "detach_between_levels": True},
    "fractional-k": {"k": 2.5},
    "no-decoder-norm-rescaling": {"rescale_acts_by_decoder_norm": False},
    "b_dec-not-applied-to-input": {"apply_b_dec_to_input": False},
    "matryoshka-aux-loss": {"use_matryoshka_aux_loss": True},
    "matryoshka-aux-loss-topk": {"use_matryoshka_aux_loss": True, "activation": "topk"},
    "dictionary-learning-aux": {"aux_loss_form": "dictionary_learning"},
    "dictionary-learning-aux-per-level": {
        "aux_loss_form": "dictionary_learning",
        "use_matryoshka_aux_loss": True,
    },
    "unit-norm-decoder": {"normalize_decoder": True, "rescale_acts_by_decoder_norm": False},
    "paper-recipe": {
        "normalize_decoder": True,
        "rescale_acts_by_decoder_norm": False,
        "aux_loss_form": "dictionary_learning",
        "b_dec_init": "geometric_median",
        "inference_threshold": "ema",
        "level_weights": [0.1, 0.1, 0.1],
    },
}


@pytest.mark.filterwarnings("ignore:.*only one level")
@pytest.mark.parametrize("config", list(STEP_CONFIGS))
def test_training_step_equals_the_dense_path(config: str) -> None:
    """Every loss term, every logged metric and every gradient, dense vs sparse."""
    dense, sparse = (_sae(path, **STEP_CONFIGS[config]) for path in ("dense", "sparse"))
    x = torch.randn(40, D_IN, dtype=torch.double) * 2 + 0.3
    dead = torch.arange(D_SAE) % 3 == 0
    dense_out, sparse_out = train_step(dense, x, dead), train_step(sparse, x, dead)

    assert sparse_out.losses.keys() == dense_out.losses.keys()
    assert float(sparse_out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    for name, value in dense_out.losses.items():
        torch.testing.assert_close(sparse_out.losses[name], value, msg=name)
    assert sparse_out.feature_acts.is_sparse  # no n_tokens x d_sae activation matrix
    torch.testing.assert_close(sparse_out.feature_acts.to_dense(), dense_out.feature_acts)
    torch.testing.assert_close(sparse_out.hidden_pre, dense_out.hidden_pre)
    torch.testing.assert_close(sparse_out.sae_out, dense_out.sae_out)
    assert sparse_out.metrics.keys() == dense_out.metrics.keys()
    for name, metric in dense_out.metrics.items():
        want = metric() if callable(metric) else metric
        have = sparse_out.metrics[name]
        torch.testing.assert_close(have() if callable(have) else have, want, msg=name)
    dense_params = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, dense_params[name].grad, msg=name)


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_many_optimizer_steps_reach_the_same_weights(activation: str) -> None:
    dense, sparse = (_sae(path, activation=activation) for path in ("dense", "sparse"))
    generator = torch.Generator().manual_seed(1)
    optimizers = [torch.optim.Adam(sae.parameters(), lr=1e-2) for sae in (dense, sparse)]
    for step in range(30):
        x = torch.randn(32, D_IN, dtype=torch.double, generator=generator)
        dead = torch.rand(D_SAE, generator=generator) < 0.2
        for sae, optimizer in zip((dense, sparse), optimizers, strict=True):
            train_step(sae, x, dead)
            optimizer.step()
        torch.testing.assert_close(sparse.W_enc, dense.W_enc, msg=f"step {step}")
    for (name, have), want in zip(
        sparse.state_dict().items(), dense.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(have, want, msg=name)


def _largest_saved_tensor(training_path: str, n_tokens: int, d_sae: int) -> int:
    """The most elements of any tensor autograd keeps for backward in one training step."""
    saved: list[int] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN,
            d_sae=d_sae,
            k=4,
            matryoshka_widths=[64, 512, d_sae],
            training_path=training_path,  # type: ignore[arg-type]
        )
    )
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        train_step(sae, torch.randn(n_tokens, D_IN), torch.zeros(d_sae, dtype=torch.bool))
    return max(saved)


def test_backward_saves_no_dense_activation_matrix() -> None:
    """The sparse path keeps at most k entries per token for backward, never n_tokens x d_sae."""
    n_tokens, d_sae = 256, 2048
    assert _largest_saved_tensor("dense", n_tokens, d_sae) >= n_tokens * d_sae
    assert _largest_saved_tensor("sparse", n_tokens, d_sae) < n_tokens * d_sae / 8


def test_bfloat16_autocast_step_stays_close_to_the_dense_path() -> None:
    paths = {}
    x = torch.randn(64, D_IN)
    for path in ("dense", "sparse"):
        sae = _sae(path, dtype="float32")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = train_step(sae, x, torch.arange(D_SAE) % 4 == 0)
        assert torch.isfinite(out.loss)
        paths[path] = (out, sae)
    (dense_out, dense), (sparse_out, sparse) = paths["dense"], paths["sparse"]
    torch.testing.assert_close(sparse_out.loss, dense_out.loss, rtol=2e-2, atol=1e-2)
    for (name, have), want in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert have.grad is not None and have.grad.dtype == torch.float32, name
        assert (
            torch.nn.functional.cosine_similarity(have.grad.flatten(), want.grad.flatten(), dim=0)
            > 0.99
        ), name


def test_eval_mode_uses_the_jumprelu_threshold_not_the_sparse_selection() -> None:
    sae = _sae("sparse")
    sae.activation_fn.last_cutoff.fill_(0.5)
    sae.eval()
    x = torch.randn(16, D_IN, dtype=torch.double)
    with torch.no_grad():
        out = step_output(sae, x, logging=False)
        expected = sae.encode(x)
    torch.testing.assert_close(out.feature_acts, expected)
    assert (out.feature_acts[out.feature_acts > 0] > 0.5).all()
    assert sae.activation_fn.last_cutoff.item() == 0.5  # evaluation learns nothing


def test_training_path_defaults_and_errors() -> None:
    def cfg(**fields: Any) -> MatryoshkaTrainingSAEConfig:
        return MatryoshkaTrainingSAEConfig(d_in=4, d_sae=8, matryoshka_widths=[2, 8], **fields)

    assert cfg(k=2).sparse_training
    assert cfg(k=2, activation="topk").sparse_training
    assert not cfg(k=2, training_path="dense").sparse_training
    assert not cfg(activation="jumprelu").sparse_training
    assert not cfg(activation="relu").sparse_training
    with pytest.raises(ValueError, match=r"training_path='sparse' needs activation.*'relu'"):
        cfg(activation="relu", training_path="sparse")
    with pytest.raises(ValueError, match=r"training_path must be one of.*got 'fast'"):
        cfg(k=2, training_path="fast")
