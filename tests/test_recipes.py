"""The paper's recipe: each option against a hand computation or dictionary_learning's trainer."""

from __future__ import annotations

import math
import types
import warnings
from typing import Any

import pytest
import torch
from sae_lens import LanguageModelSAERunnerConfig

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, paper_recipe
from sae_lens_matryoshka.collectives import SINGLE_PROCESS
from sae_lens_matryoshka.io.interop import to_inference
from sae_lens_matryoshka.losses import VarianceNormalizedAuxLoss
from sae_lens_matryoshka.parametrization import geometric_median
from sae_lens_matryoshka.recipes import (
    PAPER_GROUP_FRACTIONS,
    level_weights_from_group_weights,
    widths_from_group_fractions,
)

from .conftest import step_output

D_IN, D_SAE, K, BATCH = 12, 64, 4, 64


def _reference_trainer(dl: types.SimpleNamespace, **arguments: Any) -> Any:
    """dictionary_learning's ``MatryoshkaBatchTopKTrainer`` with the paper's group fractions."""
    fields = {"warmup_steps": 0, "device": "cpu", "seed": 0, **arguments}
    return dl.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer(
        steps=100,
        activation_dim=D_IN,
        dict_size=D_SAE,
        k=K,
        layer=0,
        lm_name="tiny",
        group_fractions=list(PAPER_GROUP_FRACTIONS),
        **fields,
    )


def _ours(ae: Any, **overrides: Any) -> MatryoshkaTrainingSAE:
    """Our SAE on the paper's recipe, holding the reference autoencoder's weights."""
    recipe = paper_recipe(D_IN, D_SAE, K, BATCH, 100 * BATCH, **overrides)
    sae = MatryoshkaTrainingSAE(recipe["sae"])
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(ae, name))
    return sae


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(3 * D_IN, D_IN, generator=generator)
    return [
        (torch.rand(BATCH, 3 * D_IN, generator=generator) < 0.15).float() @ directions
        + 0.3 * torch.randn(BATCH, D_IN, generator=generator)
        + 1.5
        for _ in range(n)
    ]


@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_the_recipe_has_the_reference_trainers_loss_and_gradients(
    dictionary_learning: types.SimpleNamespace, training_path: str
) -> None:
    """Levels, weights, BatchTopK and the variance-normalised aux loss on dead latents."""
    trainer = _reference_trainer(dictionary_learning)
    ae = trainer.ae
    dead = torch.arange(D_SAE) >= D_SAE - 10
    with torch.no_grad():
        ae.b_dec.copy_(torch.randn(D_IN))
        # weakly positive dead latents: below the BatchTopK cut-off, so they stay dead,
        # but their ReLU'd pre-activations carry the aux loss and its gradients
        ae.W_enc[:, dead] *= 0.05
        ae.b_enc[dead] = 0.02
    trainer.num_tokens_since_fired[dead] = 10**8  # past the trainer's 10M-token window
    (x,) = _batches(1)
    ours = _ours(ae, training_path=training_path)

    reference_loss = trainer.loss(x, step=5)
    reference_loss.backward()
    assert trainer.dead_features == int(dead.sum())  # none of them fired in this batch
    out = step_output(ours, x, dead, step=5)
    out.loss.backward()

    torch.testing.assert_close(out.loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert float(out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    project = (
        dictionary_learning.matryoshka_batch_top_k.remove_gradient_parallel_to_decoder_directions
    )
    reference_grads = {
        "W_enc": ae.W_enc.grad,
        "b_enc": ae.b_enc.grad,
        "b_dec": ae.b_dec.grad,
        "W_dec": project(ae.W_dec.T, ae.W_dec.grad.T, D_IN, D_SAE).T,
    }
    for name, grad in reference_grads.items():
        torch.testing.assert_close(getattr(ours, name).grad, grad, rtol=1e-4, atol=1e-6)
    assert float(ae.b_enc.grad[dead].abs().sum()) > 0  # the aux loss reached the dead latents


def test_three_updates_equal_the_reference_trainers(
    dictionary_learning: types.SimpleNamespace,
) -> None:
    """b_dec from the first batch's geometric median, the decoder held at unit norm, the
    gradient projected and clipped, Adam, and the threshold EMA from its start step."""
    lr = 1e-3
    trainer = _reference_trainer(dictionary_learning, lr=lr, threshold_start_step=0)
    ours = _ours(trainer.ae, topk_threshold_start_step=1)  # it updates at steps above 0
    optimizer = torch.optim.Adam(ours.parameters(), lr=lr, betas=(0.9, 0.999))
    for step, x in enumerate(_batches(3)):
        trainer.update(step, x)
        out = step_output(ours, x, step=step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)  # as SAELens's trainer does
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            median = trainer.geometric_median(x)
            assert not torch.allclose(median, torch.zeros(D_IN))
    ours.decoder.before_step(ours.W_dec)  # the renormalisation after its last update

    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(
            getattr(ours, name), getattr(trainer.ae, name), rtol=1e-4, atol=1e-5, msg=name
        )
    ema = ours.activation_fn.topk_threshold
    assert float(trainer.ae.threshold) > 0
    torch.testing.assert_close(ema.float(), trainer.ae.threshold, rtol=1e-5, atol=1e-7)
    saved = to_inference(ours).state_dict()["threshold"]
    torch.testing.assert_close(saved, trainer.ae.threshold.expand(D_SAE), rtol=1e-5, atol=1e-7)


def test_geometric_median_by_hand_and_against_the_reference(
    dictionary_learning: types.SimpleNamespace,
) -> None:
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(square, SINGLE_PROCESS), torch.tensor([1.0, 1.0]))
    # an outlier moves the mean, not the median: of three points on a line, the middle one
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
    median = geometric_median(line, SINGLE_PROCESS)
    assert abs(float(median[0]) - 1.0) < 0.05 and abs(float(median[1])) < 1e-6
    points = torch.randn(200, D_IN) * torch.linspace(0.5, 3, D_IN) + 4
    reference = dictionary_learning.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer
    torch.testing.assert_close(
        geometric_median(points, SINGLE_PROCESS), reference.geometric_median(points)
    )


def test_geometric_median_b_dec_is_set_on_the_first_step_only() -> None:
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, D_SAE], b_dec_init="geometric_median"
        )
    )
    first, second = _batches(2)
    step_output(sae, first, step=0)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(first, SINGLE_PROCESS))
    before = sae.b_dec.detach().clone()
    step_output(sae, second, step=1)
    assert torch.equal(sae.b_dec.detach(), before)


def test_unit_norm_decoder_projects_gradients_and_renormalises() -> None:
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        matryoshka_widths=[8, D_SAE],
        normalize_decoder=True,
        rescale_acts_by_decoder_norm=False,
    )
    assert cfg.decoder_init_norm == 0.1  # SAELens's default, which a unit-norm decoder overrides
    sae = MatryoshkaTrainingSAE(cfg)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    optimizer = torch.optim.Adam(sae.parameters(), lr=0.05)
    for step, x in enumerate(_batches(3)):
        out = step_output(sae, x, step=step)
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # before the step
        out.loss.backward()
        grad = sae.W_dec.grad
        assert grad is not None and float(grad.abs().sum()) > 0
        # latents that never fired have no gradient; the others' is ~30, so float32 leaves ~1e-4
        along_rows = (grad * sae.W_dec.detach()).sum(dim=-1)
        assert float(along_rows.abs().max()) < 1e-5 * float(grad.norm(dim=-1).max())
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))  # moved off the sphere
    saved = to_inference(sae)
    torch.testing.assert_close(saved.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_variance_normalised_aux_loss_by_hand() -> None:
    residual = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    recon = torch.tensor([[1.0, 1.0], [2.0, 0.0], [2.0, 2.0]])
    # errors 1, 1, 1 -> mean 1; residual mean (2, 1), deviations 2, 2, 0 -> mean 4/3
    loss = VarianceNormalizedAuxLoss()(recon, residual, 50, SINGLE_PROCESS)
    torch.testing.assert_close(loss, torch.tensor(0.75))
    flat = torch.ones(4, 2)
    # no variance to normalise by: 0 (dictionary_learning would give the largest float)
    assert float(VarianceNormalizedAuxLoss()(flat * 0, flat, 1, SINGLE_PROCESS)) == 0.0


def _batchtopk(**fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, D_SAE], **fields
        )
    )


def test_the_ema_starts_at_its_step_and_can_be_the_saved_threshold() -> None:
    ema_sae = _batchtopk(inference_threshold="ema", topk_threshold_start_step=2)
    last_sae = _batchtopk()
    cutoffs = []
    for step, x in enumerate(_batches(4)):
        for sae in (ema_sae, last_sae):
            step_output(sae, x, step=step)
        cutoffs.append(float(last_sae.activation_fn.last_cutoff))
        if step < 2:
            assert float(ema_sae.activation_fn.topk_threshold) == -1.0
    expected = cutoffs[2] + 0.01 * (cutoffs[3] - cutoffs[2])  # starts at step 2's cut-off
    assert float(ema_sae.activation_fn.topk_threshold) == pytest.approx(expected)
    assert float(to_inference(ema_sae).state_dict()["threshold"][0]) == pytest.approx(
        expected, rel=1e-6
    )
    assert float(to_inference(last_sae).state_dict()["threshold"][0]) == pytest.approx(
        cutoffs[3], rel=1e-6
    )


def test_an_ema_that_never_started_saves_the_last_cutoff_with_a_warning() -> None:
    sae = _batchtopk(inference_threshold="ema", topk_threshold_start_step=1000)
    for step, x in enumerate(_batches(2)):
        step_output(sae, x, step=step)
    with pytest.warns(UserWarning, match="the EMA starts at step 1000"):
        saved = to_inference(sae)
    assert float(saved.state_dict()["threshold"][0]) == pytest.approx(
        float(sae.activation_fn.last_cutoff)
    )


def test_paper_recipe_builds_a_runner_config_on_our_conventions() -> None:
    recipe = paper_recipe(2304, 65536, 40, train_batch_size_tokens=2048, training_tokens=10**9)
    sae = recipe["sae"]
    assert sae.matryoshka_widths == [2048, 6144, 14336, 30720, 65536]
    assert sae.level_weights == [1 / 25] * 5  # their mean of (1/5) * MSE_l
    assert (sae.aux_loss_coefficient, sae.aux_loss_form) == (1 / 32, "dictionary_learning")
    assert sae.normalize_decoder and not sae.rescale_acts_by_decoder_norm
    assert sae.b_dec_init == "geometric_median"
    assert (sae.inference_threshold, sae.topk_threshold_start_step) == ("ema", 1001)
    assert sae.topk_threshold_lr == pytest.approx(0.001)
    assert recipe["lr"] == pytest.approx(1e-4)  # 2e-4 / sqrt(65536 / 2**14)
    assert recipe["dead_feature_window"] == 4882  # 10M tokens: dead from step 4883 on
    assert recipe["lr_warm_up_steps"] == 1000 and recipe["lr_decay_steps"] == 0
    cfg = LanguageModelSAERunnerConfig(
        **recipe, model_name="gemma-2-2b", hook_name="blocks.12.hook_resid_post"
    )
    assert cfg.sae is sae and cfg.dead_feature_window == 4882
    decaying = paper_recipe(64, 1024, 8, 1024, 1024 * 10_000, decay_start=8000)
    assert decaying["lr_decay_steps"] == 2000


def test_recipe_arguments_are_checked() -> None:
    assert widths_from_group_fractions(100, [0.25, 0.25, 0.5]) == [25, 50, 100]
    assert widths_from_group_fractions(10, [1 / 3, 1 / 3, 1 / 3]) == [3, 6, 10]
    assert level_weights_from_group_weights([2.0, 1.0], 2) == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"must sum to 1, got \[0.5, 0.25\]"):
        widths_from_group_fractions(64, [0.5, 0.25])
    with pytest.raises(ValueError, match="a group without latents at d_sae=16"):
        widths_from_group_fractions(16, PAPER_GROUP_FRACTIONS)
    with pytest.raises(ValueError, match="group_weights has 2 entries for 5 groups"):
        paper_recipe(64, 1024, 8, 1024, 10**7, group_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="decay_start must lie between the 1000 warm-up steps"):
        paper_recipe(64, 1024, 8, 1024, 1024 * 5000, decay_start=6000)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"inference_threshold": "median"}, "inference_threshold must be one of"),
        ({"activation": "topk", "inference_threshold": "ema"}, "applies to activation='batchtopk'"),
        ({"topk_threshold_start_step": -1}, "topk_threshold_start_step"),
        ({"aux_loss_form": "openai"}, "aux_loss_form must be one of"),
        ({"b_dec_init": "mean"}, "b_dec_init must be one of"),
        ({"normalize_decoder": "yes"}, "normalize_decoder"),
    ],
)
def test_bad_recipe_options_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, D_SAE], **fields
        )


def test_recipe_defaults_leave_saelens_conventions_unchanged() -> None:
    cfg = MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[8, D_SAE])
    assert (cfg.aux_loss_form, cfg.b_dec_init, cfg.inference_threshold) == (
        "saelens",
        "zeros",
        "last_batch",
    )
    assert not cfg.normalize_decoder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae = MatryoshkaTrainingSAE(cfg)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))
    assert math.isclose(float(sae.b_dec.detach().abs().sum()), 0.0)
