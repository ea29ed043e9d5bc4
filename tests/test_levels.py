"""Cumulative level decoding against a dense per-prefix reference."""

from __future__ import annotations

import pytest
import torch

from sae_lens_matryoshka.kernels.level_decode import decode_levels, group_bounds


@pytest.mark.parametrize("widths", [[3, 10, 32], [1, 32], [32], [5, 6, 7, 31, 32]])
@pytest.mark.parametrize("batch_shape", [(7,), (2, 5)])
def test_decode_levels_equals_decoding_each_prefix(
    widths: list[int], batch_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    acts = torch.randn(*batch_shape, 32).relu()
    W_dec = torch.randn(32, 6)
    b_dec = torch.randn(6)
    levels = decode_levels(acts, W_dec, b_dec, widths)
    assert levels.shape == (len(widths), *batch_shape, 6)
    for level, width in enumerate(widths):
        masked = acts * (torch.arange(32) < width)
        torch.testing.assert_close(levels[level], masked @ W_dec + b_dec, rtol=1e-5, atol=1e-5)


def test_decode_levels_backpropagates_like_the_reference() -> None:
    torch.manual_seed(0)
    widths = [4, 9, 16]
    acts = torch.randn(5, 16).relu().requires_grad_()
    W_dec = torch.randn(16, 3, requires_grad=True)
    weights = torch.tensor([0.5, 2.0, 1.0])
    (
        decode_levels(acts, W_dec, torch.zeros(3), widths).pow(2).sum((1, 2)) * weights
    ).sum().backward()
    ours = (acts.grad.clone(), W_dec.grad.clone())
    acts.grad, W_dec.grad = None, None
    reference = sum(
        weight * ((acts * (torch.arange(16) < width)) @ W_dec).pow(2).sum()
        for weight, width in zip(weights, widths, strict=True)
    )
    reference.backward()
    torch.testing.assert_close(ours[0], acts.grad)
    torch.testing.assert_close(ours[1], W_dec.grad)


def test_group_bounds() -> None:
    assert group_bounds([2, 5, 9]) == [(0, 2), (2, 5), (5, 9)]
