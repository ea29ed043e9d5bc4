"""A training step keeps every tensor on the SAE's device: checked in CI, which has no GPU.

Each case moves a small SAE to the stand-in accelerator of ``fake_device``
(a device that is not the CPU; its tensors compute with CPU data) and takes
two steps as SAELens's trainer takes them (``training_forward_pass``, then
``loss.backward()``): the first with no latent dead, the second with a third
of them dead, so that the dead-latent loss runs (whole-SAE or per level). A
tensor the step makes on the CPU (an index, a constant, ``torch.arange``
without ``device``, a draw from a CPU generator) and mixes with the SAE's
fails the step with ``DeviceMismatch``; the controls at the end plant such
tensors and check that it does. The losses and gradients must equal the same
steps on the CPU, so the stand-in computes what it claims.

Copies from the host to the device are allowed but recorded: on CUDA a
blocking copy from pageable memory synchronises the stream. After the first
step (which builds the fixed level plan, once per device) a step with fixed
levels copies nothing. A step with ``prefix_sampling="pareto"`` copies its
freshly drawn group bounds, without waiting (``non_blocking``, from pinned
memory on CUDA): the sampler draws with a CPU generator on purpose (its
state is a CPU buffer, saved in checkpoints) and its widths are Python
integers the step needs on the host anyway, so that one small copy is
expected. BatchTopK's
threshold sampler (``kernels.selection``) draws with a generator made on the
device: the batch here (64 tokens x 256 latents) is large enough that it runs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, step
from sae_lens_matryoshka.kernels import selection
from sae_lens_matryoshka.losses import level_mse

from .conftest import ACTIVATION_FIELDS, train_step
from .fake_device import FAKE_DEVICE, DeviceMismatch, on_fake_device, to_fake_device

D_IN, D_SAE, N_TOKENS = 16, 256, 64
#: the activations that can train on the sparse path
K_SPARSE = ("batchtopk", "topk")
#: the penalty coefficients SAELens's trainer hands every step (each activation reads its own)
COEFFICIENTS = {"l0": 0.01, "l1": 0.01}
#: where the only host-to-device copies of a step after the first are made, per level schedule
EXPECTED_COPIES = {"fixed": [], "pareto": ["levels.py:step_plan"]}


@pytest.fixture(autouse=True)
def _fresh_threshold_sample() -> Iterator[None]:
    """BatchTopK's sample positions are cached per device: each case draws them on its device."""
    selection._sample_positions.cache_clear()
    yield
    selection._sample_positions.cache_clear()


def _sae(**fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    return MatryoshkaTrainingSAE(
        MatryoshkaTrainingSAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            matryoshka_widths=[16, 64, D_SAE],
            n_sampled_prefixes=4,
            **fields,
        )
    )


def _batch(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The input, no latent dead, a third dead: made on ``device``, as SAELens's trainer has them."""
    x = torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    latents = torch.arange(D_SAE, device=device)
    return x.to(device), latents < 0, latents % 3 == 0


def _first_step(sae: MatryoshkaTrainingSAE) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's first step (no latent dead); returns the batch and dead mask of the next one."""
    x, none_dead, dead = _batch(sae.W_dec.device, sae.W_dec.dtype)
    train_step(sae, x, none_dead, **COEFFICIENTS)
    return x, dead


def _check_step_on_device(fields: dict[str, Any], levels: str) -> None:
    on_cpu = _sae(**fields)
    on_device = to_fake_device(copy.deepcopy(on_cpu))
    with on_fake_device():
        x, dead = _first_step(on_device)
    with on_fake_device() as seen:
        out = train_step(on_device, x, dead, **COEFFICIENTS)
    assert seen.host_to_device == EXPECTED_COPIES[levels]
    aux = out.losses["auxiliary_reconstruction_loss"].detach()
    assert float(aux) > 0, "the dead latents must train"
    expected = train_step(on_cpu, *_first_step(on_cpu), **COEFFICIENTS)
    torch.testing.assert_close(out.loss.cpu(), expected.loss)
    for (name, parameter), reference in zip(
        on_device.named_parameters(), on_cpu.parameters(), strict=True
    ):
        assert parameter.grad is not None and parameter.grad.device == FAKE_DEVICE, name
        torch.testing.assert_close(parameter.grad.cpu(), reference.grad, msg=name)


@pytest.mark.parametrize("use_matryoshka_aux_loss", [False, True], ids=["aux", "per-level-aux"])
@pytest.mark.parametrize("levels", ["fixed", "pareto"])
@pytest.mark.parametrize(
    ("activation", "path"),
    [
        (name, path)
        for name in ACTIVATION_FIELDS
        for path in ("sparse", "dense")
        if path == "dense" or name in K_SPARSE
    ],
)
def test_a_training_step_keeps_every_tensor_on_the_device(
    activation: str, path: str, levels: str, use_matryoshka_aux_loss: bool
) -> None:
    fields = {
        "activation": activation,
        "training_path": path,
        "prefix_sampling": levels,
        "use_matryoshka_aux_loss": use_matryoshka_aux_loss,
        **ACTIVATION_FIELDS[activation],
    }
    _check_step_on_device(fields, levels)


@pytest.mark.parametrize(
    "options",
    [
        {"rescale_acts_by_decoder_norm": True, "detach_between_levels": True},
        {"level_weights": [1.0, 0.5, 0.25]},
        {"dtype": "bfloat16"},
    ],
    ids=["rescaled-detached", "level-weights", "bfloat16"],
)
def test_other_options_keep_every_tensor_on_the_device(options: dict[str, Any]) -> None:
    fields = {"activation": "batchtopk", "k": 4, "use_matryoshka_aux_loss": True, **options}
    _check_step_on_device(fields, "fixed")


def test_the_paper_recipe_step_copies_nothing_to_the_device() -> None:
    """The paper's code's options: geometric-median ``b_dec``, unit-norm rows, its aux loss."""
    fields = {
        "activation": "batchtopk",
        "k": 4,
        "b_dec_init": "geometric_median",
        "normalize_decoder": True,
        "rescale_acts_by_decoder_norm": False,
        "aux_loss_form": "dictionary_learning",
        "use_matryoshka_aux_loss": True,
    }
    _check_step_on_device(fields, "fixed")


def _plant_constant(reconstructions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return level_mse(reconstructions, x) + torch.zeros(1)


def _plant_index(reconstructions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return level_mse(reconstructions, x)[torch.arange(reconstructions.shape[0])]


def _plant_cpu_generator(reconstructions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    noise = torch.rand(1, generator=torch.Generator(), device=x.device)
    return level_mse(reconstructions, x) + 0 * noise


@pytest.mark.parametrize(
    ("planted", "message"),
    [
        (_plant_constant, "aten.add.Tensor mixes tensors on meta with CPU tensors"),
        (_plant_index, "aten.index.Tensor mixes tensors on meta with CPU tensors"),
        (_plant_cpu_generator, "rand draws on meta from a generator on cpu"),
    ],
    ids=["constant", "index", "cpu-generator"],
)
def test_a_tensor_left_on_the_cpu_fails_the_step(
    planted: Any, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same step with one CPU tensor planted in its loss must fail, saying where."""
    monkeypatch.setattr(step, "level_mse", planted)
    sae = to_fake_device(_sae(activation="batchtopk", k=4))
    with on_fake_device(), pytest.raises(DeviceMismatch, match=rf"{message}.*{planted.__name__}"):
        _first_step(sae)
