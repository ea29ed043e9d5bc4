"""A step's largest tensors written where an earlier step's were (``kernels.kept_memory``).

The weight matrices' gradients and the pre-activations. Against the same
training with new memory for each: the same weights bit for bit, through
SAELens's trainer, with every candidate of the two kernels that write the
gradients, with and without the dead-latent loss; and nothing anyone still
holds is ever written over.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from typing import NamedTuple

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, step
from sae_lens_matryoshka.kernels import encoder_backward, kept_memory, level_decode
from sae_lens_matryoshka.kernels.encoder_backward import ENCODER_WEIGHT_GRAD
from sae_lens_matryoshka.kernels.level_decode import DECODER_WEIGHT_GRAD
from sae_lens_matryoshka.kernels.selection import batch_topk_entries, sampled_batch_topk_entries
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import pin_kernel, step_input, train_step

STEPS = 4


def _sae() -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    cfg = MatryoshkaTrainingSAEConfig(d_in=12, d_sae=48, k=3, matryoshka_widths=[6, 18, 48])
    return MatryoshkaTrainingSAE(cfg)


def _new_memory_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every gradient and the pre-activations in memory of their own, as before they were kept."""

    def new(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)

    monkeypatch.setattr(encoder_backward, "empty_gradient", new)
    monkeypatch.setattr(level_decode, "empty_gradient", new)
    monkeypatch.setattr(step, "pre_activations", torch.addmm)


class Places(NamedTuple):
    """Where a run's tensors lay, step by step."""

    #: each step's ``W_enc`` and ``W_dec`` gradients
    gradients: list[tuple[int, int]]
    #: each step's pre-activations
    pre_activations: list[int]


def _train(dead_window: int) -> tuple[MatryoshkaTrainingSAE, Places, list[bool]]:
    """``STEPS`` steps of SAELens's trainer: the SAE, where each step's gradients and
    pre-activations lay, and whether any latent was dead at each step."""
    sae = _sae()
    places = Places([], [])
    sae.hook_sae_acts_pre.register_forward_hook(
        lambda _module, _inputs, hidden_pre: places.pre_activations.append(hidden_pre.data_ptr())
    )
    batches = iter(torch.randn(STEPS, 64, 12, generator=torch.Generator().manual_seed(1)) * 2)
    # a dead-feature window of 1 step: from the second step on, the latents that
    # did not fire are dead and the dead-latent loss adds its own gradients
    cfg = short_run_trainer_config(STEPS, batch_size=64, lr=1e-2, dead_feature_window=dead_window)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    any_dead: list[bool] = []

    def note(*_: object) -> None:
        assert sae.W_enc.grad is not None and sae.W_dec.grad is not None
        places.gradients.append((sae.W_enc.grad.data_ptr(), sae.W_dec.grad.data_ptr()))
        any_dead.append(bool(trainer.dead_neurons.any()))

    trainer.optimizer.register_step_pre_hook(note)
    trainer.fit()
    return sae, places, any_dead


@pytest.mark.parametrize(
    ("encoder", "decoder"),
    list(itertools.product(sorted(ENCODER_WEIGHT_GRAD.candidates), DECODER_WEIGHT_GRAD.candidates)),
)
@pytest.mark.parametrize("dead_window", [1000, 1], ids=["no-dead-latent", "dead-latents"])
def test_trainer_steps_reuse_kept_memory_and_train_the_same_weights(
    monkeypatch: pytest.MonkeyPatch, encoder: str, decoder: str, dead_window: int
) -> None:
    pin_kernel(monkeypatch, "encoder_weight_grad", encoder)
    pin_kernel(monkeypatch, "decoder_weight_grad", decoder)
    kept, places, any_dead = _train(dead_window)
    # one gradient of each weight per step, the dead-latent loss's entries included
    # (kernels.entry_sets): it lies where the last one did
    assert any(any_dead) == (dead_window == 1)
    assert len(set(places.gradients)) == 1, places
    # the trainer's step output no longer holds them after the step (kept_outputs)
    assert len(places.pre_activations) == STEPS
    assert len(set(places.pre_activations)) == 1, places
    with monkeypatch.context() as fresh:
        _new_memory_every_time(fresh)
        new, _, _ = _train(dead_window)
    for name, parameter in kept.named_parameters():
        assert torch.equal(parameter, dict(new.named_parameters())[name]), name


def test_a_gradient_someone_keeps_is_never_written_over() -> None:
    sae = _sae()
    x, y = torch.randn(2, 32, 12, generator=torch.Generator().manual_seed(2)) * 2
    train_step(sae, x)
    held_enc, held_dec = sae.W_enc.grad, sae.W_dec.grad
    assert held_enc is not None and held_dec is not None
    copies = held_enc.clone(), held_dec.clone()
    sae.zero_grad(set_to_none=True)
    train_step(sae, y)
    assert torch.equal(held_enc, copies[0]) and torch.equal(held_dec, copies[1])
    assert sae.W_enc.grad.data_ptr() != held_enc.data_ptr()
    assert sae.W_dec.grad.data_ptr() != held_dec.data_ptr()


def test_pre_activations_someone_keeps_are_never_written_over() -> None:
    """A loop that holds each step's output (SAELens's trainer without ``kept_outputs``)."""
    sae = _sae()
    batches = torch.randn(4, 32, 12, generator=torch.Generator().manual_seed(4)) * 2
    outputs = [sae.training_forward_pass(step_input(batch)) for batch in batches]
    copies = [output.hidden_pre.clone() for output in outputs]
    for output, copy in zip(outputs, copies, strict=True):
        assert torch.equal(output.hidden_pre, copy)
    assert len({output.hidden_pre.data_ptr() for output in outputs}) == len(outputs)
    # each one the encoder's matmul, as with new memory: a fresh SAE's same steps
    del outputs
    fresh = _sae()
    for batch, copy in zip(batches, copies, strict=True):
        with torch.no_grad():
            again = fresh.training_forward_pass(step_input(batch)).hidden_pre
        assert torch.equal(again, copy)


def test_pre_activations_are_torchs_addmm_wherever_they_are_not_kept() -> None:
    """Under autocast, with a graph or off the CPU: ``addmm`` itself, nothing kept."""
    generator = torch.Generator().manual_seed(5)
    b_enc, sae_in, W_enc = (
        torch.randn(*shape, generator=generator) for shape in ((6,), (4, 3), (3, 6))
    )
    expected = torch.addmm(b_enc, sae_in, W_enc)
    with torch.no_grad():
        kept = kept_memory.pre_activations(b_enc, sae_in, W_enc)
    assert torch.equal(kept, expected)
    assert len(kept_memory._KEPT[W_enc]["pre-activations"]) == 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = kept_memory.pre_activations(b_enc, sae_in, W_enc)
        assert torch.equal(low, torch.addmm(b_enc, sae_in, W_enc))
    assert low.dtype == torch.bfloat16
    weight = W_enc.clone().requires_grad_()
    with_graph = kept_memory.pre_activations(b_enc, sae_in, weight)
    assert with_graph.grad_fn is not None and weight not in kept_memory._KEPT
    with torch.no_grad():
        meta = kept_memory.pre_activations(*(t.to("meta") for t in (b_enc, sae_in, W_enc)))
    assert meta.device.type == "meta"
    assert len(kept_memory._KEPT[W_enc]["pre-activations"]) == 1


def test_the_selection_flags_each_call_where_the_last_call_did() -> None:
    """Scratch memory: the same block every call, the same entries as with new memory."""
    hidden_pre = torch.randn(64, 512, generator=torch.Generator().manual_seed(6))
    first = sampled_batch_topk_entries(hidden_pre, 40)
    (block,) = kept_memory._KEPT[kept_memory._SCRATCH]["selection flags"]
    again = sampled_batch_topk_entries(hidden_pre * 2, 40)
    (same,) = kept_memory._KEPT[kept_memory._SCRATCH]["selection flags"]
    assert same is block
    for have, want in zip(again, first, strict=True):
        assert torch.equal(have, want)
    smaller = sampled_batch_topk_entries(hidden_pre[:32], 20)  # another shape: replaced
    (other,) = kept_memory._KEPT[kept_memory._SCRATCH]["selection flags"]
    assert other.shape == (32 * 512,)
    assert torch.equal(smaller.latent, batch_topk_entries(hidden_pre[:32], 20).latent)


def test_gradients_of_two_backward_passes_add_up() -> None:
    """Gradient accumulation (no ``zero_grad`` between two batches) sums, as with new memory."""
    x, y = torch.randn(2, 32, 12, generator=torch.Generator().manual_seed(3)) * 2
    alone = {}
    for batch in (x, y):
        sae = _sae()
        train_step(sae, batch)
        alone[id(batch)] = (sae.W_enc.grad.clone(), sae.W_dec.grad.clone())
    sae = _sae()
    train_step(sae, x)
    sae.training_forward_pass(step_input(y)).loss.backward()  # added to the kept gradients
    torch.testing.assert_close(sae.W_enc.grad, alone[id(x)][0] + alone[id(y)][0])
    torch.testing.assert_close(sae.W_dec.grad, alone[id(x)][1] + alone[id(y)][1])


def test_kept_memory_is_bounded_and_goes_with_its_weight() -> None:
    weight = torch.nn.Parameter(torch.zeros(5, 7))
    first = kept_memory.empty_gradient(weight, torch.float32)
    place = first.data_ptr()
    del first
    assert kept_memory.empty_gradient(weight, torch.float32).data_ptr() == place

    held = [kept_memory.empty_gradient(weight, torch.float32) for _ in range(5)]
    assert len({tensor.data_ptr() for tensor in held}) == 5  # each held one is its own
    assert len(kept_memory._KEPT[weight]["gradient"]) == kept_memory.KEPT_PER_USE

    # another dtype than the weight's (a float32 gradient of bfloat16 weights) is not kept
    wide = torch.nn.Parameter(torch.zeros(5, 7, dtype=torch.bfloat16))
    assert kept_memory.empty_gradient(wide, torch.float32).dtype == torch.float32
    assert wide not in kept_memory._KEPT
    # nor is memory on another device than the CPU (a GPU's allocator reuses it already)
    meta = torch.nn.Parameter(torch.zeros(5, 7, device="meta"))
    assert kept_memory.empty_gradient(meta, torch.float32).device.type == "meta"
    assert meta not in kept_memory._KEPT

    blocks = [weakref.ref(block) for block in kept_memory._KEPT[weight]["gradient"]]
    del weight, held
    gc.collect()
    assert all(block() is None for block in blocks)  # the kept memory went with its weight
