"""``target_l0``: the ReLU/L1 and JumpReLU penalties' coefficient steered to a target L0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.activations import TARGET_L0_MULTIPLIER, TargetL0
from sae_lens_matryoshka.toy import ToyHierarchy, short_run_trainer_config
from sae_lens_matryoshka.toy.model import single_thread

from .conftest import step_output, train_step

#: a toy whose true L0 is 3.12, so that a target below it binds the penalty
TOY = {
    "n_parents": 4,
    "n_independent": 8,
    "parent_probability": 0.3,
    "independent_probability": 0.15,
}


def _cfg(**fields: Any) -> MatryoshkaTrainingSAEConfig:
    return MatryoshkaTrainingSAEConfig(
        d_in=8, d_sae=32, matryoshka_widths=[4, 32], **{"activation": "relu", **fields}
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"activation": "batchtopk", "k": 2, "target_l0": 4.0},
            r"target_l0 adapts .* jumprelu / relu; activation='batchtopk'",
        ),
        (
            {"activation": "topk", "k": 2, "target_l0": 4.0},
            r"target_l0 adapts .*activation='topk' fixes its L0",
        ),
        ({"target_l0": 0.0}, r"target_l0 must be a finite number > 0.0, got 0.0"),
        ({"target_l0": -3.0}, r"target_l0 must be a finite number > 0.0, got -3.0"),
        ({"target_l0": math.nan}, r"target_l0 must be a finite number > 0.0, got nan"),
        ({"target_l0": math.inf}, r"target_l0 must be a finite number > 0.0, got inf"),
        ({"target_l0": True}, r"target_l0 must be a finite number > 0.0, got True"),
        ({"target_l0": "40"}, r"target_l0 must be a finite number > 0.0, got '40'"),
        ({"target_l0": 33.0}, r"target_l0 must be in \(0, d_sae=32\] .*got 33.0"),
        ({"target_l0_rate": 0.0}, r"target_l0_rate must be a finite number > 0.0, got 0.0"),
        ({"target_l0_rate": 1.5}, r"target_l0_rate must be in \(0, 1\] .*got 1.5"),
    ],
)
def test_bad_target_l0_settings_are_refused(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=r"MatryoshkaTrainingSAEConfig\." + expected):
        _cfg(**fields)


def test_without_target_l0_nothing_changes() -> None:
    """No buffer, no metric, the scheduled coefficient alone (the default is unchanged)."""
    for activation in ("relu", "jumprelu"):
        sae = MatryoshkaTrainingSAE(_cfg(activation=activation))
        assert TARGET_L0_MULTIPLIER not in sae.state_dict()
        out = step_output(sae, torch.randn(16, 8), l1=1.0, l0=1.0)
        assert TARGET_L0_MULTIPLIER not in out.metrics


def test_the_multiplier_moves_towards_the_target_at_a_bounded_rate() -> None:
    control = TargetL0(target=10.0, rate=0.1)
    one = torch.ones(())

    def after(l0: float) -> float:
        return float(control.next_multiplier(one, torch.tensor(l0)))

    assert after(10.0) == 1.0  # on target: held
    assert after(20.0) == pytest.approx(math.exp(0.1 * math.log(2.0)))  # too dense: up
    assert after(5.0) == pytest.approx(math.exp(-0.1 * math.log(2.0)))  # too sparse: down
    assert after(1e6) == pytest.approx(math.exp(0.1))  # far off: at most exp(rate) a step
    assert after(0.0) == pytest.approx(math.exp(-0.1))  # nothing fired: the largest decrease
    assert after(11.0) - 1 < after(12.0) - 1  # proportional near the target


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_the_step_scales_the_penalty_and_updates_after_the_warm_up(activation: str) -> None:
    """The penalty is the scheduled coefficient times the multiplier, which the step then moves."""
    name = "l1" if activation == "relu" else "l0"
    cfg = _cfg(activation=activation, target_l0=1.0, **{f"{name}_warm_up_steps": 2})
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(cfg)
    assert sae.state_dict()[TARGET_L0_MULTIPLIER].dtype == torch.float32
    x = torch.randn(64, 8)
    out = train_step(sae, x, **{name: 0.5})  # step 0, in the warm-up: held at 1
    assert float(out.metrics[TARGET_L0_MULTIPLIER]) == 1.0
    # past the warm-up; about half the 32 latents fire: too dense, so the multiplier rises
    plain = step_output(sae, x, step=2, **{name: 0.5})
    plain.loss.backward()  # the update did not touch what the loss's graph holds
    moved = float(sae.activation_fn.target_l0_multiplier)
    assert (
        moved == pytest.approx(math.exp(0.01))
        and float(plain.metrics[TARGET_L0_MULTIPLIER]) == moved
    )
    sae.activation_fn.target_l0_multiplier.fill_(2.0)
    twice = step_output(sae, x, step=2, **{name: 0.5})
    loss = f"{name}_loss"
    torch.testing.assert_close(twice.losses[loss], 2 * plain.losses[loss])


def _train_on_toy(cfg: MatryoshkaTrainingSAEConfig, steps: int, seed: int) -> MatryoshkaTrainingSAE:
    toy = ToyHierarchy(seed=seed, **TOY)
    torch.manual_seed(seed)
    sae = MatryoshkaTrainingSAE(cfg)
    trainer_cfg = short_run_trainer_config(steps, batch_size=256, lr=3e-3, dead_feature_window=50)
    with single_thread():
        SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=toy.batches(256, stream=1)).fit()
    return sae


@pytest.mark.parametrize(
    ("activation", "coefficient", "rate", "steps"),
    [("relu", 0.1, 0.02, 600), ("jumprelu", 1.0, 0.02, 1000)],
)
def test_a_toy_run_reaches_its_target_l0(
    activation: str, coefficient: float, rate: float, steps: int
) -> None:
    """Started from a coefficient far from the one it needs, the run ends within 10% of 2.5.

    L0 measured on fresh toy samples, with the trained SAE as it will be saved.
    """
    target = 2.5
    toy = ToyHierarchy(seed=0, **TOY)
    name = "l1" if activation == "relu" else "l0"
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=toy.directions.shape[1],
        d_sae=64,
        matryoshka_widths=[4, 64],
        activation=activation,  # type: ignore[arg-type]
        target_l0=target,
        target_l0_rate=rate,
        **{f"{name}_coefficient": coefficient},
    )
    sae = _train_on_toy(cfg, steps, seed=0)
    sae.eval()
    with torch.no_grad():
        l0 = float((sae.encode(toy.sample(8192)[1]) > 0).sum(dim=-1).float().mean())
    assert abs(l0 / target - 1) < 0.1, (l0, float(sae.activation_fn.target_l0_multiplier))
    assert float(sae.activation_fn.target_l0_multiplier) > 2  # it had to move the coefficient


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_the_multiplier_is_checkpointed_and_resumed_but_not_saved_for_inference(
    activation: str, tmp_path: Path
) -> None:
    cfg = _cfg(activation=activation, target_l0=2.0)
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(cfg)
    x = torch.randn(64, 8)
    for step in range(3):
        step_output(sae, x, step=step, l1=0.5, l0=0.5)
    multiplier = sae.state_dict()[TARGET_L0_MULTIPLIER].clone()
    assert multiplier != 1.0

    resumed = MatryoshkaTrainingSAE(cfg)
    resumed.load_state_dict(sae.state_dict())
    assert torch.equal(resumed.state_dict()[TARGET_L0_MULTIPLIER], multiplier)

    sae.save_model(tmp_path / "checkpoint")
    loaded = MatryoshkaTrainingSAE.load_from_disk(tmp_path / "checkpoint")
    assert torch.equal(loaded.state_dict()[TARGET_L0_MULTIPLIER], multiplier)
    # a bfloat16 SAE keeps the multiplier's float32 (bfloat16 would round its small steps away)
    low = MatryoshkaTrainingSAE.load_from_disk(tmp_path / "checkpoint", dtype="bfloat16")
    assert low.W_enc.dtype == torch.bfloat16
    assert torch.equal(low.state_dict()[TARGET_L0_MULTIPLIER], multiplier)
    resumed = MatryoshkaTrainingSAE(cfg)
    resumed.process_state_dict_for_loading(state := dict(sae.state_dict()))
    resumed.load_state_dict(state)
    # both continue identically
    torch.testing.assert_close(
        step_output(resumed, x, step=3, l1=0.5, l0=0.5).losses,
        step_output(sae, x, step=3, l1=0.5, l0=0.5).losses,
    )
    assert torch.equal(
        resumed.activation_fn.target_l0_multiplier, sae.activation_fn.target_l0_multiplier
    )

    sae.save_inference_model(tmp_path / "saved")
    plain = MatryoshkaTrainingSAE(_cfg(activation=activation))
    plain.save_inference_model(tmp_path / "plain")
    saved = MatryoshkaSAE.load_from_disk(tmp_path / "saved")
    assert set(saved.state_dict()) == set(
        MatryoshkaSAE.load_from_disk(tmp_path / "plain").state_dict()
    )
    assert TARGET_L0_MULTIPLIER not in saved.state_dict()


def test_a_checkpoint_and_a_run_that_disagree_on_target_l0_still_load() -> None:
    """Adding target_l0 starts the multiplier at 1; dropping it drops the multiplier, saying so."""
    without = MatryoshkaTrainingSAE(_cfg())
    with_control = MatryoshkaTrainingSAE(_cfg(target_l0=2.0))
    state = dict(without.state_dict())
    with_control.process_state_dict_for_loading(state)
    with_control.load_state_dict(state)
    assert float(with_control.activation_fn.target_l0_multiplier) == 1.0

    with_control.activation_fn.target_l0_multiplier.fill_(3.0)
    state = dict(with_control.state_dict())
    with pytest.warns(UserWarning, match=r"multiplied the l1 coefficient by 3; .*target_l0=None"):
        without.process_state_dict_for_loading(state)
    without.load_state_dict(state)
