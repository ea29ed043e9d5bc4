"""The measured kernels of the sparse level decode, each candidate against a dense oracle.

``group_decode`` (the groups' decode, ``G @ W_dec``) and ``decoder_weight_grad``
(``W_dec``'s gradient, ``G.T @ grad``) each have an ``embedding_bag`` and a CSR
candidate, ``decode_values_grad`` (the values' gradient) torch's
``embedding_bag`` kernel and sampled CSR products over the token-major
entries and over their latent-major order; a run uses whichever its
machine measured fastest. Every candidate,
pinned with ``SAE_MATRYOSHKA_KERNELS``, must give the decode and the gradients
of a dense matmul under autograd, and a whole training step must equal the
dense path's with each. Unpinned, the kernels measure once per key and keep
their choice.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from sae_lens_matryoshka.kernels import measured
from sae_lens_matryoshka.kernels.level_decode import (
    DECODE_VALUES_GRAD,
    DECODER_WEIGHT_GRAD,
    GROUP_DECODE,
    decode_groups,
    decode_key,
)
from sae_lens_matryoshka.kernels.measured import CACHE_ENV

from .conftest import new_empty_filled_with_nan, pin_kernel, train_step
from .test_sparse_path import _sae

KERNELS = (GROUP_DECODE, DECODER_WEIGHT_GRAD, DECODE_VALUES_GRAD)
#: every combination of (group_decode, decoder_weight_grad, decode_values_grad) candidates
COMBOS = list(itertools.product(*(sorted(kernel.candidates) for kernel in KERNELS)))
COMBO_IDS = [f"decode-{f}-grad-{b}-values-{v}" for f, b, v in COMBOS]


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """No choice left from another test: a kept choice would win over a pin."""
    for kernel in KERNELS:
        monkeypatch.setattr(kernel, "chosen", {})


def _pin(monkeypatch: pytest.MonkeyPatch, **choices: str | None) -> None:
    """Pin (or, with None, unpin) these kernels; the suite's other pins stay as they are."""
    for kernel, candidate in choices.items():
        pin_kernel(monkeypatch, kernel, candidate)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``kernel/candidate`` of every candidate call from now on, in order."""
    calls: list[str] = []

    def noting(label: str, candidate: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append(label)
            return candidate(*args)

        return call

    for kernel in KERNELS:
        for name, candidate in list(kernel.candidates.items()):
            monkeypatch.setitem(kernel.candidates, name, noting(f"{kernel.name}/{name}", candidate))
    return calls


class Entries:
    """Token-major entries of ``n_tokens`` tokens over ``d_sae`` latents, their groups, a ``W_dec``."""

    def __init__(
        self, per_token: int, widths: list[int], dtype: torch.dtype, n_tokens: int = 9
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.n_tokens, self.d_sae, self.d_in = n_tokens, widths[-1], 6
        scores = torch.randn(self.n_tokens, self.d_sae, generator=generator)
        scores[:, -1] = -torch.inf  # the last latent has no entry
        scores[3] = -torch.inf  # nor has token 3: every one of its bags is empty
        latent = scores.topk(per_token, dim=-1).indices.sort(dim=-1).values
        keep = torch.ones_like(latent, dtype=torch.bool)
        keep[3] = False
        self.token = torch.arange(self.n_tokens).repeat_interleave(per_token)[keep.flatten()]
        self.latent = latent.flatten()[keep.flatten()]
        self.values = torch.randn(len(self.token), dtype=dtype, generator=generator)
        self.W_dec = torch.randn(self.d_sae, self.d_in, dtype=dtype, generator=generator)
        self.bounds = torch.tensor(widths[:-1], dtype=torch.long)
        self.n_groups = len(widths)
        self.upstream = torch.randn(
            self.n_tokens, self.n_groups, self.d_in, dtype=dtype, generator=generator
        )

    def bag(self) -> torch.Tensor:
        group = torch.bucketize(self.latent, self.bounds, right=True)
        return self.token * self.n_groups + group

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ours: the groups' decode and the gradients of values and ``W_dec``."""
        values = self.values.clone().requires_grad_()
        W_dec = self.W_dec.clone().requires_grad_()
        out = decode_groups(values, self.token, self.latent, W_dec, self.n_tokens, self.bounds)
        assert out.grad_fn is not None
        decode = out.grad_fn.next_functions[0][0]  # under the view
        assert decode is not None and decode.name() == "GroupDecodeBackward"
        grads = torch.autograd.grad((out * self.upstream).sum(), (values, W_dec))
        return out.detach(), grads[0], grads[1]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The oracle: the dense ``[n_bags, d_sae]`` matrix times ``W_dec``, under autograd."""
        values = self.values.clone().requires_grad_()
        W_dec = self.W_dec.clone().requires_grad_()
        n_bags = self.n_tokens * self.n_groups
        matrix = values.new_zeros(n_bags, self.d_sae).index_put((self.bag(), self.latent), values)
        out = (matrix @ W_dec).view(self.n_tokens, self.n_groups, self.d_in)
        grads = torch.autograd.grad((out * self.upstream).sum(), (values, W_dec))
        return out.detach(), grads[0], grads[1]


WIDTHS = {
    "one-group": [64],
    "several-groups": [4, 20, 64],
    "tiny-first-groups": [1, 2, 63, 64],  # bags that are empty for most tokens
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("widths", list(WIDTHS), ids=list(WIDTHS))
@pytest.mark.parametrize(("forward", "backward", "values"), COMBOS, ids=COMBO_IDS)
def test_each_candidate_is_the_dense_decode_and_its_gradients(
    monkeypatch: pytest.MonkeyPatch,
    forward: str,
    backward: str,
    values: str,
    widths: str,
    dtype: torch.dtype,
) -> None:
    """Outputs and both gradients, also when the result is written over NaN-filled memory."""
    _pin(monkeypatch, group_decode=forward, decoder_weight_grad=backward, decode_values_grad=values)
    calls = _spy(monkeypatch)
    entries = Entries(per_token=9, widths=WIDTHS[widths], dtype=dtype)
    assert not bool((entries.latent == entries.d_sae - 1).any())  # a latent with no entry
    expected = entries.dense()
    got = entries.decode()
    assert calls == [
        f"group_decode/{forward}",
        f"decode_values_grad/{values}",
        f"decoder_weight_grad/{backward}",
    ]
    for name, have, want in zip(
        ("decode", "values' grad", "W_dec's grad"), got, expected, strict=True
    ):
        torch.testing.assert_close(have, want, msg=name)
    assert bool((got[2][-1] == 0).all())  # the latent with no entry: a zero row
    assert bool((got[0][3] == 0).all())  # the token with no entry: zero decodes
    # whatever memory the results are written over held (NaN here) is ignored
    with new_empty_filled_with_nan():
        over_nan = entries.decode()
    for name, have, want in zip(
        ("decode", "values' grad", "W_dec's grad"), over_nan, got, strict=True
    ):
        assert torch.equal(have, want), name


@pytest.mark.parametrize("forward", sorted(GROUP_DECODE.candidates))
def test_the_values_gradient_does_not_depend_on_the_forward_candidate(
    monkeypatch: pytest.MonkeyPatch, forward: str
) -> None:
    """Torch's own values' gradient kernel, handed the entries' bags: bit for bit either way."""
    entries = Entries(per_token=9, widths=WIDTHS["several-groups"], dtype=torch.float32)
    _pin(monkeypatch, group_decode="bagged", decoder_weight_grad="bagged")
    _, reference, _ = entries.decode()
    _pin(monkeypatch, group_decode=forward, decoder_weight_grad="bagged")
    _, values_grad, _ = entries.decode()
    assert torch.equal(values_grad, reference)


@pytest.mark.parametrize("widths", list(WIDTHS), ids=list(WIDTHS))
def test_the_values_gradient_latent_by_latent_is_the_token_major_one_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, widths: str
) -> None:
    """The same dot products, read in another order and put back: not one bit differs.

    Its tokens and latents without entries included (token 3, the last latent).
    """
    entries = Entries(per_token=9, widths=WIDTHS[widths], dtype=torch.float32, n_tokens=40)
    _pin(monkeypatch, decode_values_grad="sampled")
    _, token_major, _ = entries.decode()
    _pin(monkeypatch, decode_values_grad="sampled_by_latent")
    _, latent_major, _ = entries.decode()
    assert torch.equal(latent_major, token_major)
    assert not torch.equal(latent_major, latent_major.sort().values)  # token-major, not sorted


def test_the_bagged_candidates_are_torchs_embedding_bag_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the decode computed before it was measured: forward and values' gradient exactly.

    ``W_dec``'s gradient too from 32,768 entries, where torch's backward
    sorts stably (see ``GroupDecode``); here 33,584.
    """
    _pin(monkeypatch, group_decode="bagged", decoder_weight_grad="bagged")
    entries = Entries(per_token=16, widths=[256, 1024, 4096], dtype=torch.float32, n_tokens=2100)
    assert len(entries.latent) >= 1 << 15
    ours = entries.decode()
    values = entries.values.clone().requires_grad_()
    W_dec = entries.W_dec.clone().requires_grad_()
    offsets = torch.searchsorted(entries.bag(), torch.arange(entries.n_tokens * 3))
    torchs = torch.nn.functional.embedding_bag(
        entries.latent, W_dec, offsets, mode="sum", per_sample_weights=values
    ).view(entries.n_tokens, 3, -1)
    grads = torch.autograd.grad((torchs * entries.upstream).sum(), (values, W_dec))
    for name, have, want in zip(
        ("decode", "values' grad", "W_dec's grad"), ours, (torchs, *grads), strict=True
    ):
        assert torch.equal(have, want), name


@pytest.mark.parametrize(
    ("forward", "backward", "values"), [("csr", "csr", "sampled"), ("bagged", "bagged", "bagged")]
)
def test_a_float32_decode_under_bfloat16_autocast_stays_in_float32(
    monkeypatch: pytest.MonkeyPatch, forward: str, backward: str, values: str
) -> None:
    """Autocast would multiply a CSR product in bfloat16: the candidates run outside it."""
    _pin(monkeypatch, group_decode=forward, decoder_weight_grad=backward, decode_values_grad=values)
    entries = Entries(per_token=9, widths=WIDTHS["several-groups"], dtype=torch.float32)
    plain = entries.decode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = entries.decode()
    for name, have, want in zip(
        ("decode", "values' grad", "W_dec's grad"), autocast, plain, strict=True
    ):
        assert have.dtype == torch.float32, name
        assert torch.equal(have, want), name


STEPS: dict[str, dict[str, Any]] = {
    "paper-levels": {},
    "tiny-first-levels": {"matryoshka_widths": [1, 2, 63, 64]},
    "detach-between-levels": {"detach_between_levels": True},
    "topk-matryoshka-aux-loss": {"activation": "topk", "use_matryoshka_aux_loss": True},
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", list(STEPS))
@pytest.mark.parametrize(("forward", "backward", "values"), COMBOS, ids=COMBO_IDS)
def test_a_training_step_equals_the_dense_path_with_each_candidate(
    monkeypatch: pytest.MonkeyPatch,
    forward: str,
    backward: str,
    values: str,
    config: str,
    dtype: str,
) -> None:
    """Every loss and every gradient, with the decode's kernels pinned, dead latents included."""
    _pin(monkeypatch, group_decode=forward, decoder_weight_grad=backward, decode_values_grad=values)
    calls = _spy(monkeypatch)
    dense, sparse = (_sae(path, dtype=dtype, **STEPS[config]) for path in ("dense", "sparse"))
    x = torch.randn(40, 12, dtype=getattr(torch, dtype)) * 2 + 0.3
    dead = torch.arange(64) % 3 == 0
    dense_out, sparse_out = train_step(dense, x, dead), train_step(sparse, x, dead)
    # the levels' decode and the dead-latent loss's, forward and backward, each with the pin
    assert sorted(set(calls)) == [
        f"decode_values_grad/{values}",
        f"decoder_weight_grad/{backward}",
        f"group_decode/{forward}",
    ]
    assert float(sparse_out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    assert sparse_out.losses.keys() == dense_out.losses.keys()
    for name, value in dense_out.losses.items():
        torch.testing.assert_close(sparse_out.losses[name], value, msg=name)
    dense_params = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, dense_params[name].grad, msg=name)


def test_unpinned_the_decode_kernels_measure_once_and_keep_their_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Both candidates timed on the first call for a key, then only the chosen one; kept on disk."""
    _pin(monkeypatch, group_decode=None, decoder_weight_grad=None, decode_values_grad=None)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "kernels"))
    calls = _spy(monkeypatch)
    entries = Entries(per_token=9, widths=WIDTHS["several-groups"], dtype=torch.float32)
    first = entries.decode()
    key = decode_key(entries.W_dec, entries.n_tokens, entries.n_groups, len(entries.latent))
    assert key == (9, 3, (64, 6), 8, torch.float32, torch.device("cpu"))  # 8 entries per token
    # W_dec's gradient is measured per tuple of sets (here one: no dead-latent loss)
    keys = {kernel.name: (key,) if kernel is DECODER_WEIGHT_GRAD else key for kernel in KERNELS}
    for kernel in KERNELS:
        assert set(kernel.chosen) == {keys[kernel.name]}
        assert kernel.chosen[keys[kernel.name]] in kernel.candidates
        # each candidate: one untimed call and the timed ones; then the chosen one runs
        for name in kernel.candidates:
            assert calls.count(f"{kernel.name}/{name}") >= 1 + measured._TIMED_CALLS
        kept = [
            json.loads(path.read_text())
            for path in (tmp_path / "kernels").glob(f"{kernel.name}-*.json")
        ]
        chosen = kernel.chosen[keys[kernel.name]]
        assert [entry["choice"] for entry in kept] == [chosen]
        assert set(kept[0]["measured_ms"]) == set(kernel.candidates)
        assert measured.choices()[kernel.name] == {measured._describe(keys[kernel.name]): chosen}
    calls.clear()
    again = entries.decode()
    assert calls == [
        f"group_decode/{GROUP_DECODE.chosen[key]}",
        f"decode_values_grad/{DECODE_VALUES_GRAD.chosen[key]}",
        f"decoder_weight_grad/{DECODER_WEIGHT_GRAD.chosen[(key,)]}",
    ]
    for have, want in zip(again, first, strict=True):
        assert torch.equal(have, want)
    torch.testing.assert_close(first[0], entries.dense()[0])
