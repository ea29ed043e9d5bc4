"""Our loss and gradients against SAELens's own Matryoshka and BatchTopK SAEs.

SAELens's ``matryoshka_batchtopk`` computes the same objective in a different
way (a full decode, then every inner level decoded again), so for identical
parameters and input it is an independent oracle for every loss term and every
gradient. Full training runs through SAELens's own ``SAETrainer`` must then
reach the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import dense, step_input, step_output, train_step

D_IN, D_SAE, K = 12, 48, 3


def _pair(
    widths: list[int], **options: object
) -> tuple[MatryoshkaTrainingSAE, MatryoshkaBatchTopKTrainingSAE]:
    """Our SAE and SAELens's with identical (random, non-unit-norm) parameters."""
    torch.manual_seed(0)
    ours = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=widths, **options
        )
    )
    options.pop("training_path", None)
    ref = MatryoshkaBatchTopKTrainingSAE(
        MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=list(widths), **options
        )
    )
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    _copy_params(ours, ref)
    return ours, ref


def _copy_params(source: TrainingSAE, target: TrainingSAE) -> None:
    params = dict(source.named_parameters())
    target.load_state_dict({name: params[name].detach().clone() for name in params}, strict=False)


def _assert_same(ours_out: TrainStepOutput, ref_out: TrainStepOutput, ours, ref) -> None:
    assert ours_out.losses.keys() == ref_out.losses.keys()
    for name, value in ref_out.losses.items():
        torch.testing.assert_close(ours_out.losses[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(ours_out.feature_acts), ref_out.feature_acts)
    torch.testing.assert_close(ours_out.sae_out, ref_out.sae_out, rtol=1e-5, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5)


DEAD_MASKS = {
    "none": None,
    "no-dead": torch.zeros(D_SAE, dtype=torch.bool),
    "some-dead": torch.arange(D_SAE) % 3 == 0,
    "all-dead": torch.ones(D_SAE, dtype=torch.bool),
    "dead-in-last-group-only": torch.arange(D_SAE) >= 40,
}


@pytest.mark.parametrize("widths", [[6, 18, 48], [1, 2, 47, 48], [24, 48]])
@pytest.mark.parametrize("dead_name", list(DEAD_MASKS))
@pytest.mark.parametrize("use_matryoshka_aux_loss", [False, True])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_loss_and_gradients_equal_saelens_matryoshka(
    widths: list[int],
    dead_name: str,
    use_matryoshka_aux_loss: bool,
    rescale: bool,
    training_path: str,
) -> None:
    ours, ref = _pair(
        widths,
        use_matryoshka_aux_loss=use_matryoshka_aux_loss,
        rescale_acts_by_decoder_norm=rescale,
        training_path=training_path,
    )
    x = torch.randn(40, D_IN) * 2 + 0.3
    dead = DEAD_MASKS[dead_name]
    _assert_same(train_step(ours, x, dead), train_step(ref, x, dead), ours, ref)


def test_aux_loss_is_exercised_by_the_oracle() -> None:
    """The dead masks above must produce a non-zero aux loss for the comparison to mean anything."""
    ours, _ = _pair([6, 18, 48], use_matryoshka_aux_loss=True)
    out = train_step(ours, torch.randn(40, D_IN), DEAD_MASKS["some-dead"])
    assert out.losses["auxiliary_reconstruction_loss"] > 0


def test_apply_b_dec_to_input_false_matches_saelens() -> None:
    ours, ref = _pair([6, 18, 48], apply_b_dec_to_input=False)
    x = torch.randn(40, D_IN)
    _assert_same(train_step(ours, x, None), train_step(ref, x, None), ours, ref)


def test_single_level_equals_saelens_batchtopk() -> None:
    """With one level, the Matryoshka SAE is exactly SAELens's plain BatchTopK SAE."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="only one level"):
        cfg = MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[D_SAE])
    ours = MatryoshkaTrainingSAE(cfg)
    ref = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    _copy_params(ours, ref)
    x = torch.randn(40, D_IN)
    dead = DEAD_MASKS["some-dead"]
    _assert_same(train_step(ours, x, dead), train_step(ref, x, dead), ours, ref)


def test_calculate_aux_loss_hook_equals_training_forward_pass() -> None:
    for use_matryoshka_aux_loss in (False, True):
        ours, _ = _pair([6, 18, 48], use_matryoshka_aux_loss=use_matryoshka_aux_loss)
        x = torch.randn(40, D_IN)
        out = step_output(ours, x, DEAD_MASKS["some-dead"], logging=False)
        hook = ours.calculate_aux_loss(
            step_input(x, DEAD_MASKS["some-dead"], logging=False),
            out.feature_acts,
            out.hidden_pre,
            out.sae_out,
        )
        torch.testing.assert_close(
            hook["auxiliary_reconstruction_loss"], out.losses["auxiliary_reconstruction_loss"]
        )


def _batches(seed: int, n: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    for _ in range(n):
        codes = (torch.rand(64, D_SAE, generator=generator) < 0.05).float()
        yield codes @ directions + 0.05 * torch.randn(64, D_IN, generator=generator)


@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_training_with_saelens_trainer_reaches_the_same_weights(training_path: str) -> None:
    """Many optimizer steps through SAELens's own trainer: same weights as its Matryoshka."""
    steps = 60
    ours, ref = _pair([6, 18, 48], use_matryoshka_aux_loss=True, training_path=training_path)
    trainer_cfg = short_run_trainer_config(steps, batch_size=64, lr=1e-3, dead_feature_window=5)
    for sae in (ours, ref):
        SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(1, steps)).fit()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, ref_params[name], rtol=1e-4, atol=1e-5)
