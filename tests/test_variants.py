"""The design space: topk / jumprelu / relu activations, level weights, stop-gradient, sampled prefixes.

Single-level SAEs are compared with SAELens's own TopK, JumpReLU and standard
(ReLU + L1) training SAEs; multi-level behaviour with dense references that
decode each prefix separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.io.checkpoints import mark_complete
from sae_lens_matryoshka.levels import pareto_prefix_probabilities, sample_prefix_widths

from .conftest import dense, step_output, train_step

D_IN, D_SAE = 12, 48
WIDTHS = [6, 18, 48]


def _ours(**fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    base: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "matryoshka_widths": WIDTHS}
    base.update(fields)
    if base["matryoshka_widths"] == [D_SAE]:
        with pytest.warns(UserWarning, match="only one level"):
            sae = MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**base))
    else:
        sae = MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**base))
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.copy_(torch.rand_like(param) * 0.4)
            else:
                param.copy_(torch.randn_like(param) * 0.5)
    return sae


def _assert_grads_equal(ours: TrainingSAE, ref: TrainingSAE) -> None:
    """Gradients by the saved names (ours keeps a JumpReLU's threshold in its activation)."""
    ref_params = ref.state_dict(keep_vars=True)
    for name, param in ours.state_dict(keep_vars=True).items():
        assert param.grad is not None, name
        torch.testing.assert_close(
            param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name
        )


DEAD = torch.arange(D_SAE) % 3 == 0


def test_single_level_topk_equals_saelens_topk() -> None:
    ours = _ours(activation="topk", k=4, matryoshka_widths=[D_SAE])
    ref = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, D_IN)
    out, ref_out = train_step(ours, x, DEAD), train_step(ref, x, DEAD)
    assert (dense(out.feature_acts) > 0).sum(-1).max() <= 4
    torch.testing.assert_close(dense(out.feature_acts), ref_out.feature_acts)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(out.losses[name], ref_out.losses[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(ours, ref)


def test_single_level_jumprelu_equals_saelens_jumprelu() -> None:
    ours = _ours(
        activation="jumprelu",
        matryoshka_widths=[D_SAE],
        rescale_acts_by_decoder_norm=False,
        aux_loss_coefficient=0.0,
        jumprelu_bandwidth=0.3,
    )
    ref = JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, jumprelu_bandwidth=0.3)
    )
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, D_IN)
    out, ref_out = train_step(ours, x, DEAD, l0=0.7), train_step(ref, x, DEAD, l0=0.7)
    torch.testing.assert_close(dense(out.feature_acts), ref_out.feature_acts)
    for name in ("mse_loss", "l0_loss"):
        torch.testing.assert_close(out.losses[name], ref_out.losses[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(ours, ref)
    # the estimator really reaches the thresholds
    assert ours.activation_fn.threshold.grad.abs().sum() > 0


def test_single_level_relu_equals_saelens_standard() -> None:
    ours = _ours(
        activation="relu",
        matryoshka_widths=[D_SAE],
        rescale_acts_by_decoder_norm=False,
        aux_loss_coefficient=0.0,
    )
    ref = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(30, D_IN)
    out, ref_out = train_step(ours, x, DEAD, l1=0.3), train_step(ref, x, DEAD, l1=0.3)
    for name in ("mse_loss", "l1_loss"):
        torch.testing.assert_close(out.losses[name], ref_out.losses[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(ours, ref)


def _masked_reference_levels(
    sae: MatryoshkaTrainingSAE, acts: torch.Tensor, widths: list[int]
) -> list[torch.Tensor]:
    """Each level decoded on its own by masking the latents beyond its width."""
    scale = 1 / sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else 1.0
    return [((acts * scale) * (torch.arange(D_SAE) < w)) @ sae.W_dec + sae.b_dec for w in widths]


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "jumprelu", "relu"])
def test_weighted_nested_loss_matches_a_dense_reference(activation: str) -> None:
    weights = [0.5, 2.0, 1.5]
    k = 5 if activation in ("batchtopk", "topk") else None
    ours = _ours(activation=activation, k=k, level_weights=weights, aux_loss_coefficient=0.0)
    x = torch.randn(30, D_IN)
    coefficients = {"l1": 0.3, "l0": 0.2}
    out = train_step(ours, x, **coefficients)
    ours_grads = {name: p.grad.clone() for name, p in ours.named_parameters()}

    ours.zero_grad()
    acts, hidden_pre = ours.encode_with_hidden_pre(x)
    torch.testing.assert_close(acts, dense(out.feature_acts))
    levels = _masked_reference_levels(ours, acts, WIDTHS)
    reference = sum(
        w * (lvl - x).pow(2).sum(-1).mean() for w, lvl in zip(weights, levels, strict=True)
    )
    if activation == "relu":
        unit = acts  # rescaled: activations already in unit-norm decoder units
        reference = reference + 0.3 * sum(
            w * unit[:, :width].abs().sum(-1).mean()
            for w, width in zip(weights, WIDTHS, strict=True)
        )
    if activation == "jumprelu":
        from sae_lens_matryoshka.kernels.jumprelu import StepSTE

        threshold = ours.activation_fn.threshold
        fired = StepSTE.apply(hidden_pre, threshold, ours.cfg.jumprelu_bandwidth)
        reference = reference + 0.2 * sum(
            w * fired[:, :width].sum(-1).mean() for w, width in zip(weights, WIDTHS, strict=True)
        )
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    reference.backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "relu", "jumprelu"])
def test_detach_between_levels_zeroes_gradients_of_earlier_latents(activation: str) -> None:
    k = 6 if activation in ("batchtopk", "topk") else None
    ours = _ours(activation=activation, k=k, detach_between_levels=True, aux_loss_coefficient=0.0)
    x = torch.randn(40, D_IN)
    acts = ours.encode(x)
    levels = ours.decode_levels(acts)
    for level, width in enumerate(WIDTHS):
        ours.zero_grad()
        (levels[level] - x).pow(2).sum(-1).mean().backward(retain_graph=True)
        start = 0 if level == 0 else WIDTHS[level - 1]
        assert torch.all(ours.W_dec.grad[:start] == 0)
        assert torch.all(ours.W_enc.grad[:, :start] == 0)
        assert torch.all(ours.b_enc.grad[:start] == 0)
        assert ours.W_dec.grad[start:width].abs().sum() > 0
        assert torch.all(ours.W_dec.grad[width:] == 0)
        if activation == "jumprelu":
            assert torch.all(ours.activation_fn.threshold.grad[:start] == 0)


def test_detached_loss_matches_a_stop_gradient_reference() -> None:
    ours = _ours(
        activation="batchtopk",
        k=6,
        detach_between_levels=True,
        aux_loss_coefficient=0.0,
        level_weights=[1.0, 0.5, 2.0],
    )
    x = torch.randn(40, D_IN)
    out = train_step(ours, x)
    ours_grads = {name: p.grad.clone() for name, p in ours.named_parameters()}
    ours.zero_grad()
    acts = ours.encode(x)
    scaled = acts / ours.W_dec.norm(dim=-1)
    previous = None
    reference = torch.zeros(())
    for weight, (start, end) in zip([1.0, 0.5, 2.0], [(0, 6), (6, 18), (18, 48)], strict=True):
        group = scaled[:, start:end] @ ours.W_dec[start:end]
        level = group + ours.b_dec if previous is None else previous.detach() + group
        reference = reference + weight * (level - x).pow(2).sum(-1).mean()
        previous = level
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)
    reference.backward()
    for name, param in ours.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_detach_a_level_reaches_earlier_latents() -> None:
    """The control for the test above: the zeros come from the stop-gradient."""
    ours = _ours(activation="batchtopk", k=6, aux_loss_coefficient=0.0)
    x = torch.randn(40, D_IN)
    level = ours.decode_levels(ours.encode(x))[2]
    (level - x).pow(2).sum(-1).mean().backward()
    assert ours.W_dec.grad[:6].abs().sum() > 0


def test_pareto_probabilities_follow_the_power_law() -> None:
    probabilities = pareto_prefix_probabilities(101, 0.5)
    # P(l <= m) = m**p / (d_sae - 1)**p: the increments telescope
    for m in (1, 10, 50, 100):
        torch.testing.assert_close(
            probabilities[:m].sum(), torch.tensor((m / 100) ** 0.5, dtype=torch.float64)
        )
    generator = torch.Generator().manual_seed(1)
    draws = torch.tensor(
        [sample_prefix_widths(probabilities, 2, generator)[0] for _ in range(4000)]
    )
    assert abs((draws <= 25).float().mean().item() - 0.5) < 0.03  # (25 / 100) ** 0.5


def test_prefix_sampling_is_seeded_and_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    def sequence(sae: MatryoshkaTrainingSAE, n: int) -> list[list[int]]:
        return [sae.levels.step_plan(torch.device("cpu")).widths for _ in range(n)]

    fields = {"activation": "relu", "prefix_sampling": "pareto", "matryoshka_widths": []}
    first = sequence(_ours(**fields), 6)
    assert first == sequence(_ours(**fields), 6)
    assert first != sequence(_ours(**fields, prefix_sampling_seed=1), 6)
    assert len({tuple(w) for w in first}) > 1  # really resampled every step

    interrupted = _ours(**fields)
    sequence(interrupted, 3)
    interrupted.save_model(tmp_path)  # the part of SAELens's checkpoint the SAE writes
    torch.save({}, tmp_path / "trainer_state.pt")  # the trainer's part, unused here
    mark_complete(tmp_path)
    resumed = _ours(**fields)
    resumed.load_weights_from_checkpoint(tmp_path)  # what the runner does on resume
    assert sequence(resumed, 3) == first[3:]


def test_pareto_loss_is_the_sum_over_sampled_prefixes() -> None:
    ours = _ours(
        activation="relu",
        prefix_sampling="pareto",
        matryoshka_widths=[],
        n_sampled_prefixes=5,
        aux_loss_coefficient=0.0,
    )
    replay = _ours(
        activation="relu", prefix_sampling="pareto", matryoshka_widths=[], n_sampled_prefixes=5
    )
    # the same seed draws the same prefixes
    widths = replay.levels.step_plan(torch.device("cpu")).widths
    x = torch.randn(30, D_IN)
    out = train_step(ours, x, l1=0.0)
    acts = dense(out.feature_acts).detach()
    expected = sum(
        (lvl - x).pow(2).sum(-1).mean() for lvl in _masked_reference_levels(ours, acts, widths)
    )
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    assert set(out.losses) == {
        "mse_loss",
        "sampled_prefixes_mse_loss",
        "l1_loss",
        "auxiliary_reconstruction_loss",
    }


def test_pareto_logs_the_evaluation_levels_on_logging_steps() -> None:
    ours = _ours(
        activation="batchtopk", k=4, prefix_sampling="pareto", matryoshka_widths=[12, 24, 48]
    )
    x = torch.randn(30, D_IN)
    out = train_step(ours, x)
    acts = dense(out.feature_acts).detach()
    for width, level in zip(
        [12, 24, 48], _masked_reference_levels(ours, acts, [12, 24, 48]), strict=True
    ):
        mse = (level - x).pow(2).sum(-1).mean().item()
        assert out.metrics[f"level_{width}/mse"]() == pytest.approx(mse, rel=1e-5)


@pytest.mark.parametrize("prefix_sampling", ["fixed", "pareto"])
def test_level_metrics_are_built_on_logging_steps_only(prefix_sampling: str) -> None:
    """SAELens reads ``metrics`` only when it logs; other steps skip building them."""
    ours = _ours(
        activation="batchtopk", k=4, prefix_sampling=prefix_sampling, matryoshka_widths=[12, 24, 48]
    )
    x = torch.randn(30, D_IN)
    quiet = step_output(ours, x, logging=False)
    logged = step_output(ours, x, logging=True)
    level_names = {f"level_{w}/{m}" for w in (12, 24, 48) for m in ("mse", "explained_variance")}
    assert level_names <= set(logged.metrics)
    assert not level_names & set(quiet.metrics)
    # the threshold the activation learns is reported on every step
    assert "jumprelu_threshold" in quiet.metrics


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "jumprelu", "relu"])
def test_matryoshka_aux_loss_revives_dead_latents_of_every_activation(activation: str) -> None:
    k = 4 if activation in ("batchtopk", "topk") else None
    ours = _ours(activation=activation, k=k, use_matryoshka_aux_loss=True)
    x = torch.randn(30, D_IN)
    out = train_step(ours, x, DEAD, l1=0.0, l0=0.0)
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    ours.zero_grad()
    out = step_output(ours, x, DEAD, logging=False, l1=0.0, l0=0.0)
    out.losses["auxiliary_reconstruction_loss"].backward()
    assert torch.all(ours.W_dec.grad[~DEAD] == 0)  # only dead latents learn from it
    assert ours.W_dec.grad[DEAD].abs().sum() > 0
