"""The inference MatryoshkaSAE, and the training SAE's save into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from safetensors.torch import load_file

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
)
from sae_lens_matryoshka.toy import ToyHierarchy

from .conftest import quick_train, step_output


def _random_inference_sae() -> MatryoshkaSAE:
    torch.manual_seed(0)
    sae = MatryoshkaSAE(MatryoshkaSAEConfig(d_in=10, d_sae=40, matryoshka_widths=[5, 20, 40]))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
        sae.activation_fn.threshold.copy_(torch.rand(40) * 0.5)
    return sae


def test_outputs_equal_saelens_jumprelu_with_the_same_parameters() -> None:
    ours = _random_inference_sae()
    ref = JumpReLUSAE(JumpReLUSAEConfig(d_in=10, d_sae=40))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 10)
    torch.testing.assert_close(ours.encode(x), ref.encode(x))
    torch.testing.assert_close(ours(x), ref(x))
    assert (ours.encode(x) == 0).float().mean() > 0.2  # the thresholds really cut


def test_decode_levels_ends_with_the_full_decode() -> None:
    sae = _random_inference_sae()
    acts = sae.encode(torch.randn(6, 10))
    levels = sae.decode_levels(acts)
    assert levels.shape == (3, 6, 10)
    torch.testing.assert_close(levels[-1], sae.decode(acts))
    torch.testing.assert_close(levels[0], (acts * (torch.arange(40) < 5)) @ sae.W_dec + sae.b_dec)


def test_fold_W_dec_norm_keeps_outputs() -> None:
    sae = _random_inference_sae()
    x = torch.randn(8, 10)
    before = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(40))
    torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)


def _trained_sae(
    rescale: bool, steps: int = 30, activation: str = "batchtopk", **fields: object
) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=10,
            d_sae=40,
            k=3 if activation in ("batchtopk", "topk") else None,
            activation=activation,  # type: ignore[arg-type]
            matryoshka_widths=[5, 20, 40],
            rescale_acts_by_decoder_norm=rescale,
            **fields,  # type: ignore[arg-type]
        )
    )
    return quick_train(sae, steps, batch_size=64)


def test_threshold_is_the_last_cutoff_and_its_ema_is_logged() -> None:
    sae = _trained_sae(rescale=True, steps=0)
    activation = sae.activation_fn
    assert activation.topk_threshold.item() == activation.last_cutoff.item() == -1.0
    assert activation.jumprelu_threshold.item() == 0.0
    first = step_output(sae, torch.randn(64, 10)).feature_acts.to_dense()
    first_cutoff = first[first > 0].min().double()
    torch.testing.assert_close(activation.topk_threshold, first_cutoff)
    torch.testing.assert_close(activation.last_cutoff, first_cutoff)
    out = step_output(sae, torch.randn(64, 10) * 3)  # another batch, another cut-off
    second = out.feature_acts.to_dense()
    second_cutoff = second[second > 0].min().double()
    torch.testing.assert_close(activation.last_cutoff, second_cutoff)
    torch.testing.assert_close(activation.jumprelu_threshold, second_cutoff)
    torch.testing.assert_close(
        activation.topk_threshold, 0.99 * first_cutoff + 0.01 * second_cutoff
    )
    torch.testing.assert_close(out.metrics["jumprelu_threshold"], second_cutoff)
    # at its own cut-off, the batch fires exactly k = 3 latents per token
    assert int((second >= second_cutoff).sum()) == 3 * 64


@pytest.mark.parametrize("rescale", [True, False])
def test_saved_inference_sae_equals_training_sae_in_eval_mode(
    rescale: bool, tmp_path: Path
) -> None:
    trained = _trained_sae(rescale)
    trained.eval()
    trained.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "matryoshka"
    assert cfg["activation"] == "jumprelu"
    assert cfg["matryoshka_widths"] == [5, 20, 40]
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    torch.testing.assert_close(
        weights["threshold"], torch.full((40,), trained.activation_fn.last_cutoff.item())
    )

    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.matryoshka_widths == [5, 20, 40]
    x = torch.randn(100, 10)
    with torch.no_grad():
        expected_acts = trained.encode(x)
        torch.testing.assert_close(loaded.encode(x), expected_acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            loaded.decode_levels(loaded.encode(x)),
            trained.decode_levels(expected_acts),
            rtol=1e-4,
            atol=1e-5,
        )
    assert 0 < (expected_acts > 0).float().sum(-1).mean() < 40


def test_eval_mode_uses_thresholds_and_train_mode_batchtopk() -> None:
    sae = _trained_sae(rescale=True)
    x = torch.randn(50, 10)
    sae.train()
    train_acts = sae.encode(x)
    assert (train_acts > 0).sum().item() == 3 * 50
    sae.eval()
    eval_acts = sae.encode(x)
    hidden_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    threshold = sae.activation_fn.last_cutoff.float()
    torch.testing.assert_close(eval_acts, hidden_pre * (hidden_pre > threshold))


def test_fold_activation_norm_scaling_factor_keeps_inference_outputs(tmp_path: Path) -> None:
    """The runner folds the activation scale at the end; the saved SAE must see raw inputs."""
    trained = _trained_sae(rescale=True)
    trained.eval()
    x = torch.randn(50, 10)
    scale = 3.0
    with torch.no_grad():
        expected = trained(x * scale) / scale
    trained.fold_activation_norm_scaling_factor(scale)
    trained.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)


def test_batchtopk_training_checkpoint_loads_both_ways(tmp_path: Path) -> None:
    trained = _trained_sae(rescale=True)
    trained.save_model(tmp_path)
    restored = MatryoshkaTrainingSAE.load_from_disk(tmp_path)
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=1e-6, atol=0)
    as_inference = SAE.load_from_disk(tmp_path)
    assert isinstance(as_inference, MatryoshkaSAE)
    assert as_inference.cfg.activation == "jumprelu"
    x = torch.randn(30, 10)
    with torch.no_grad():
        torch.testing.assert_close(as_inference(x), trained.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("prefix_sampling", ["fixed", "pareto"])
def test_every_variant_saves_and_loads_with_equal_outputs(
    activation: str, rescale: bool, prefix_sampling: str, tmp_path: Path
) -> None:
    trained = _trained_sae(rescale, activation=activation, prefix_sampling=prefix_sampling)
    trained.eval()
    trained.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.cfg.activation == activation
    assert loaded.matryoshka_widths == [5, 20, 40]
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert ("threshold" in weights) == (activation == "jumprelu")
    assert "prefix_rng_state" not in weights
    x = torch.randn(100, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), trained.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu"])
@pytest.mark.parametrize("prefix_sampling", ["fixed", "pareto"])
def test_training_checkpoints_load_as_inference_saes(
    activation: str, prefix_sampling: str, tmp_path: Path
) -> None:
    """Unfolded checkpoints are folded as they load: the SAE their run would have saved."""
    trained = _trained_sae(True, activation=activation, prefix_sampling=prefix_sampling)
    trained.save_model(tmp_path / "checkpoint")
    trained.save_inference_model(tmp_path / "saved")
    loaded = SAE.load_from_disk(tmp_path / "checkpoint")
    assert isinstance(loaded, MatryoshkaSAE)
    assert not loaded.cfg.rescale_acts_by_decoder_norm
    saved = SAE.load_from_disk(tmp_path / "saved")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(20, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval()(x), rtol=1e-5, atol=1e-5)


def _random_params(sae: SAE) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.5)


def test_topk_inference_equals_saelens_topk() -> None:
    ours = MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=10, d_sae=40, matryoshka_widths=[5, 40], activation="topk", k=3)
    )
    _random_params(ours)
    ref = TopKSAE(TopKSAEConfig(d_in=10, d_sae=40, k=3))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(16, 10)
    torch.testing.assert_close(ours(x), ref(x))


def test_relu_inference_equals_saelens_standard() -> None:
    ours = MatryoshkaSAE(
        MatryoshkaSAEConfig(d_in=10, d_sae=40, matryoshka_widths=[5, 40], activation="relu")
    )
    _random_params(ours)
    ref = StandardSAE(StandardSAEConfig(d_in=10, d_sae=40))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(16, 10)
    torch.testing.assert_close(ours(x), ref(x))


def test_jumprelu_threshold_stays_float32_under_bfloat16() -> None:
    sae = _trained_sae(True, steps=0, activation="jumprelu")
    sae.to(dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16
    assert sae.activation_fn.threshold.dtype == torch.float32


def test_a_short_run_saves_a_threshold_that_fires_k_latents_per_token(tmp_path: Path) -> None:
    """After 50 toy steps the cut-off has grown far past its EMA: the saved SAE must still fire ~k."""
    toy = ToyHierarchy(seed=0)
    torch.manual_seed(0)
    k = toy.expected_l0
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=toy.n_features, d_sae=16, k=k, matryoshka_widths=[3, 12, 16]
        )
    )
    toy.train(sae, steps=50)
    sae.save_inference_model(tmp_path)
    saved = SAE.load_from_disk(tmp_path)
    x = toy.sample(4096)[1]
    with torch.no_grad():
        l0 = (saved.encode(x) > 0).float().sum(-1).mean().item()
        ema_threshold = sae.activation_fn.topk_threshold.clamp(min=0).float()
        pre = (x - saved.b_dec) @ saved.W_enc + saved.b_enc  # the saved (folded) pre-activations
        l0_with_ema = (pre > ema_threshold).float().sum(-1).mean().item()
    assert abs(l0 - k) < 0.25 * k, (l0, k)
    assert l0_with_ema > 2 * k  # the control: the EMA would have saved a far looser threshold


# ``sae.threshold``: the attribute surface of SAELens's JumpReLUSAE


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
def test_threshold_is_jumprelusaes_for_a_saved_sae(activation: str, tmp_path: Path) -> None:
    _trained_sae(True, activation=activation).save_inference_model(tmp_path)
    saved = load_file(tmp_path / "sae_weights.safetensors")
    ours = SAE.load_from_disk(tmp_path)
    ref = JumpReLUSAE(JumpReLUSAEConfig(d_in=10, d_sae=40))
    ref.load_state_dict(saved)
    assert isinstance(ours, MatryoshkaSAE) and ours.saelens_architecture == "jumprelu"
    assert isinstance(ours.threshold, torch.nn.Parameter) and ours.threshold.shape == (40,)
    assert ours.threshold is ours.activation_fn.threshold  # one tensor, not a copy
    torch.testing.assert_close(ours.threshold, ref.threshold)
    assert ours.threshold.gt(0).any()
    # the saved names are SAELens's, as before the attribute existed
    assert set(ours.state_dict()) == set(ref.state_dict()) == set(saved)
    # the same semantics: a latent fires only above its threshold
    x = torch.randn(64, 10)
    acts = ours.encode(x)
    fired = acts > 0
    pre = ours.process_sae_in(x) @ ours.W_enc + ours.b_enc
    assert torch.equal(fired, pre > ours.threshold)
    torch.testing.assert_close(acts, ref.encode(x))


def test_assigning_threshold_changes_encode_as_on_jumprelusae() -> None:
    """What tools written for JumpReLUSAE do (SAEDashboard slices it): assign a new Parameter."""
    ours = _random_inference_sae()
    ref = JumpReLUSAE(JumpReLUSAEConfig(d_in=10, d_sae=40))
    ref.load_state_dict(ours.state_dict())
    raised = torch.nn.Parameter(ours.threshold.detach() + 0.3)
    ours.threshold = raised
    ref.threshold = torch.nn.Parameter(raised.detach().clone())
    assert ours.activation_fn.threshold is raised
    assert set(ours.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    torch.testing.assert_close(ours.state_dict()["threshold"], raised.detach())
    x = torch.randn(32, 10)
    torch.testing.assert_close(ours.encode(x), ref.encode(x))
    # folding decoder norms scales the thresholds the same way
    ours.fold_W_dec_norm()
    ref.fold_W_dec_norm()
    torch.testing.assert_close(ours.threshold, ref.threshold)


@pytest.mark.parametrize(("activation", "fires"), [("topk", "k largest"), ("relu", "positive")])
def test_no_threshold_without_jumprelu_says_why(activation: str, fires: str) -> None:
    sae = MatryoshkaSAE(
        MatryoshkaSAEConfig(
            d_in=10,
            d_sae=40,
            matryoshka_widths=[5, 40],
            activation=activation,  # type: ignore[arg-type]
            k=3 if activation == "topk" else None,
        )
    )
    assert not hasattr(sae, "threshold")
    with pytest.raises(AttributeError, match=rf"activation='{activation}'.*{fires}.*'jumprelu'"):
        _ = sae.threshold
    with pytest.raises(AttributeError, match="no per-latent threshold"):
        sae.threshold = torch.nn.Parameter(torch.zeros(40))
    assert "threshold" not in sae.state_dict()


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "relu"])
def test_saelens_architecture_is_the_portable_forms(activation: str) -> None:
    """The SAELens class a MatryoshkaSAE computes as is the one ``to_portable`` converts it into."""
    from sae_lens.saes.topk_sae import TopK

    from sae_lens_matryoshka import to_inference, to_portable

    sae = to_inference(_trained_sae(False, steps=5, activation=activation))
    assert to_portable(sae).cfg.architecture() == sae.saelens_architecture
    # a topk SAE's activation is SAELens's TopK, as tools checking for one expect
    assert isinstance(sae.activation_fn, TopK) == (activation == "topk")
