"""The sparse training path against dense references.

Selection is compared with dense ``topk`` over the whole matrix; the sparse
encoder backward with ``gradcheck`` and with autograd through dense matmuls; the
sparse decode with the dense cumulative decode; and whole training steps,
including every loss term and every gradient, with ``training_path="dense"``
for the same parameters, for every level configuration.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.activations import batch_topk, topk
from sae_lens_matryoshka.levels import decode_levels
from sae_lens_matryoshka.sparse_kernels import (
    batch_topk_indices,
    dead_topk_indices,
    decode_levels_sparse,
    encoder_values,
    topk_indices,
)

from .conftest import train_step

D_IN, D_SAE = 12, 64


def _selected_set(token: torch.Tensor, latent: torch.Tensor) -> set[tuple[int, int]]:
    return set(zip(token.tolist(), latent.tolist(), strict=True))


def _dense_set(acts: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(t), int(j)) for t, j in acts.nonzero().tolist()}


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
    token, latent = batch_topk_indices(hidden_pre, k)
    assert _selected_set(token, latent) == _dense_set(batch_topk(hidden_pre, k))
    assert len(token) == len(_selected_set(token, latent))  # no entry twice


def test_batch_topk_selection_is_exact_when_the_sampled_threshold_overshoots() -> None:
    """Ties at the sampled quantile leave too few candidates; the fallback still ranks exactly."""
    hidden_pre = torch.ones(96, 8192)
    hidden_pre[:, ::2] = -1.0
    hidden_pre[0, :10] = torch.arange(2.0, 12.0)  # 5 values above the tie, at even columns
    k = 4
    token, latent = batch_topk_indices(hidden_pre, k)
    dense = batch_topk(hidden_pre, k)
    # ties at 1.0 may be broken differently; the kept values must be the same multiset
    assert len(token) == int(dense.count_nonzero())
    torch.testing.assert_close(
        hidden_pre[token, latent].sort().values, dense[dense > 0].sort().values
    )
    assert {(0, j) for j in range(0, 10, 2)} <= _selected_set(token, latent)


def test_batch_topk_selection_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    batch_topk_indices(torch.randn(96, 8192, generator=torch.Generator().manual_seed(1)), 8)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("shift", [0.0, -2.0])
def test_topk_selection_equals_a_dense_topk(shift: float) -> None:
    hidden_pre = torch.randn(30, 80, generator=torch.Generator().manual_seed(0)) + shift
    token, latent = topk_indices(hidden_pre, 6)
    assert _selected_set(token, latent) == _dense_set(topk(hidden_pre, 6))


def test_dead_latent_selection_equals_a_masked_topk() -> None:
    hidden_pre = torch.randn(20, 40, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(40) % 3 == 0
    token, latent = dead_topk_indices(hidden_pre, dead, 5)
    top = torch.where(dead, hidden_pre, -torch.inf).topk(5, dim=-1).indices
    expected = {(t, int(j)) for t in range(20) for j in top[t]}
    assert _selected_set(token, latent) == expected
    assert dead[latent].all()


def _encoder_inputs(scaled: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    sae_in = torch.randn(6, 5, dtype=torch.double, generator=generator).requires_grad_()
    W_enc = torch.randn(5, 9, dtype=torch.double, generator=generator).requires_grad_()
    b_enc = torch.randn(9, dtype=torch.double, generator=generator).requires_grad_()
    scale = (torch.rand(9, dtype=torch.double, generator=generator) + 0.5).requires_grad_()
    return sae_in, W_enc, b_enc, scale if scaled else None


@pytest.mark.parametrize("scaled", [False, True])
def test_sparse_encoder_backward_passes_gradcheck(scaled: bool) -> None:
    sae_in, W_enc, b_enc, scale = _encoder_inputs(scaled)
    token = torch.tensor([0, 0, 1, 3, 3, 3, 5])
    latent = torch.tensor([2, 7, 7, 0, 4, 8, 2])

    def values(*inputs: torch.Tensor) -> torch.Tensor:
        x, w, b = inputs[:3]
        s = inputs[3] if scaled else None
        hidden_pre = (x @ w + b).detach()
        if s is not None:
            hidden_pre = hidden_pre * s.detach()
        return encoder_values(x, w, b, s, hidden_pre, token, latent)

    inputs = (sae_in, W_enc, b_enc) if scale is None else (sae_in, W_enc, b_enc, scale)
    assert torch.autograd.gradcheck(values, inputs)


def test_sparse_encoder_gradients_equal_dense_autograd() -> None:
    sae_in, W_enc, b_enc, scale = _encoder_inputs(scaled=True)
    assert scale is not None
    token = torch.tensor([0, 2, 2, 4, 5])
    latent = torch.tensor([1, 1, 6, 3, 8])
    upstream = torch.randn(5, dtype=torch.double)
    dense = ((sae_in @ W_enc + b_enc) * scale)[token, latent]
    expected = torch.autograd.grad((dense * upstream).sum(), (sae_in, W_enc, b_enc, scale))
    hidden_pre = dense.new_zeros(6, 9)
    hidden_pre[token, latent] = dense.detach()
    sparse = encoder_values(sae_in, W_enc, b_enc, scale, hidden_pre, token, latent)
    got = torch.autograd.grad((sparse * upstream).sum(), (sae_in, W_enc, b_enc, scale))
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)


@pytest.mark.parametrize("widths", [[64], [4, 20, 64], [1, 2, 63, 64]])
@pytest.mark.parametrize("detach", [False, True])
def test_sparse_decode_equals_the_dense_cumulative_decode(widths: list[int], detach: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    acts = topk(torch.randn(7, 64, dtype=torch.double, generator=generator), 9)
    W_dec = torch.randn(64, 5, dtype=torch.double, generator=generator).requires_grad_()
    b_dec = torch.randn(5, dtype=torch.double, generator=generator).requires_grad_()
    dense_acts = acts.clone().requires_grad_()
    token, latent = dense_acts.detach().nonzero().unbind(1)
    values = acts[token, latent].clone().requires_grad_()
    upstream = torch.randn(len(widths), 7, 5, dtype=torch.double, generator=generator)

    dense = decode_levels(dense_acts, W_dec, b_dec, widths, detach)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (dense_acts, W_dec, b_dec))
    sparse = decode_levels_sparse(values, token, latent, W_dec, b_dec, widths, 7, detach)
    sparse_grads = torch.autograd.grad((sparse * upstream).sum(), (values, W_dec, b_dec))

    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(sparse_grads[0], dense_grads[0][token, latent])
    torch.testing.assert_close(sparse_grads[1], dense_grads[1])
    torch.testing.assert_close(sparse_grads[2], dense_grads[2])


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
    torch.testing.assert_close(sparse_out.feature_acts, dense_out.feature_acts)
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


def test_eval_mode_uses_the_inference_threshold_not_the_sparse_selection() -> None:
    sae = _sae("sparse")
    sae.topk_threshold.fill_(0.5)
    sae.eval()
    x = torch.randn(16, D_IN, dtype=torch.double)
    with torch.no_grad():
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        expected = sae.encode(x)
    torch.testing.assert_close(out.feature_acts, expected)
    assert (out.feature_acts[out.feature_acts > 0] > 0.5).all()


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
