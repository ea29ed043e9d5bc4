"""Every SAE dtype SAELens supports trains, saves and loads through our classes.

float32 and bfloat16 parameters, each with and without SAELens's bfloat16
autocast, for every activation: a short run through SAELens's ``SAETrainer``,
then a training checkpoint and an inference save, each loaded back. The
thresholds keep their own precision throughout (JumpReLU float32 as SAELens
keeps it, the BatchTopK EMA float64). float16 is a loading dtype: Adam cannot
train float16 parameters (SAELens's own SAEs turn NaN too), so the config warns
and the loss check stops such a run at the first non-finite step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaSAE, MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from sae_lens_matryoshka.toy import short_run_trainer_config

D_IN, D_SAE = 12, 48
ACTIVATIONS: dict[str, dict[str, Any]] = {
    "batchtopk": {"k": 3},
    "topk": {"k": 3},
    "jumprelu": {"l0_coefficient": 0.01},
    "relu": {"l1_coefficient": 0.01},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _batches(dtype: torch.dtype) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(D_SAE, D_IN, generator=generator)
    while True:
        codes = (torch.rand(32, D_SAE, generator=generator) < 0.06).float()
        yield (codes @ directions).to(dtype)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "bf16-autocast"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_trains_saves_and_loads_in_every_dtype(
    dtype: str, autocast: bool, activation: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            matryoshka_widths=[6, 18, D_SAE],
            activation=activation,  # type: ignore[arg-type]
            dtype=dtype,
            **ACTIVATIONS[activation],
        )
    )
    trainer_cfg = dataclasses.replace(
        short_run_trainer_config(15, batch_size=32, lr=1e-2, dead_feature_window=5),
        autocast=autocast,
    )
    before = sae.W_dec.detach().clone()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(DTYPES[dtype])).fit()

    assert sae.W_enc.dtype == sae.W_dec.dtype == DTYPES[dtype]
    assert not torch.equal(sae.W_dec.detach(), before)  # it trained
    for name, tensor in sae.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
    if activation == "jumprelu":
        assert sae.activation_fn.threshold.dtype == torch.float32
    if activation == "batchtopk":
        threshold = sae.activation_fn.topk_threshold
        assert threshold.dtype == torch.float64 and threshold > 0

    sae.save_model(tmp_path / "checkpoint")
    reloaded = MatryoshkaTrainingSAE.load_from_disk(tmp_path / "checkpoint")
    for name, tensor in sae.state_dict().items():
        assert reloaded.state_dict()[name].dtype == tensor.dtype, name
        assert torch.equal(reloaded.state_dict()[name], tensor), name

    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert isinstance(inference, MatryoshkaSAE)
    assert inference.W_enc.dtype == DTYPES[dtype]
    x = next(_batches(DTYPES[dtype]))
    sae.eval()
    with torch.no_grad():
        expected = sae.decode(sae.encode(x)).float()
        got = inference.decode(inference.encode(x)).float()
    if dtype == "float32":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * x.float().std())
    else:
        # folding the decoder norms into bfloat16 weights rounds them, which can
        # push a pre-activation across the threshold: a few tokens may decode
        # another latent set, the rest must agree
        close = torch.isclose(got, expected, rtol=5e-2, atol=5e-2 * float(x.float().std()))
        tokens_apart = int((~close.all(dim=-1)).sum())
        assert tokens_apart <= 0.05 * len(x), f"{tokens_apart} of {len(x)} tokens decode otherwise"


def test_runner_trains_bfloat16_with_autocast(
    runner_cfg: Callable[..., Any], tiny_model: Any, token_dataset: Any, tmp_path: Path
) -> None:
    sae_cfg = MatryoshkaTrainingSAEConfig(
        d_in=16, d_sae=64, k=4, matryoshka_widths=[8, 24, 64], dtype="bfloat16"
    )
    cfg = runner_cfg(sae=sae_cfg, dtype="bfloat16", autocast=True)
    LanguageModelSAETrainingRunner(
        cfg, override_dataset=token_dataset, override_model=tiny_model
    ).run()
    loaded = SAE.load_from_disk(cfg.output_path)
    assert isinstance(loaded, MatryoshkaSAE)
    assert loaded.W_dec.dtype == torch.bfloat16
    assert torch.isfinite(loaded.W_dec.float()).all()
    assert loaded.activation_fn.threshold.gt(0).all()


def test_a_float32_sae_loads_and_runs_in_float16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, matryoshka_widths=[6, D_SAE])
    )
    trainer_cfg = short_run_trainer_config(10, batch_size=32, lr=1e-2, dead_feature_window=5)
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(torch.float32)).fit()
    sae.save_inference_model(tmp_path / "sae")
    full = SAE.load_from_disk(tmp_path / "sae")
    half = SAE.load_from_disk(tmp_path / "sae", dtype="float16")
    assert isinstance(half, MatryoshkaSAE) and half.W_enc.dtype == torch.float16
    x = next(_batches(torch.float32))
    with torch.no_grad():
        expected = full.decode(full.encode(x))
        got = half.decode(half.encode(x.half())).float()
    assert (got - expected).norm() / expected.norm() < 5e-3


def test_float16_training_warns_and_a_poisoned_step_stops_before_updating() -> None:
    with pytest.warns(UserWarning, match=r"dtype='float16': Adam cannot train float16"):
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=3, matryoshka_widths=[6, D_SAE], dtype="float16"
        )
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3, matryoshka_widths=[6, D_SAE])
    )
    with torch.no_grad():
        sae.b_dec[0] = float("nan")  # what an overflowed update leaves behind
    before = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    trainer_cfg = short_run_trainer_config(10, batch_size=32, lr=1e-2, dead_feature_window=5)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(torch.float32))
    with pytest.raises(FloatingPointError, match=r"step 0: the loss is not finite.*\[.b_dec.\]"):
        trainer.fit()
    for name, tensor in sae.state_dict().items():
        assert torch.allclose(tensor, before[name], equal_nan=True), name
