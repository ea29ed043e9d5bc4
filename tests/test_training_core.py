"""The training core's design: objects chosen once, injected collectives, no needless host reads.

- every activation is an ``nn.Module`` that ``get_activation_fn`` returns, and
  its state is saved under SAELens's flat names;
- the SAE's batch-global operations go through the one ``Collectives`` object it
  is given, only in training;
- a sparse step builds no ``n_tokens x d_sae`` tensor beyond the pre-activations
  and reads from the device only what the algorithm needs.
"""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer
from torch.utils._python_dispatch import TorchDispatchMode

from sae_lens_matryoshka import (
    MatryoshkaSAE,
    MatryoshkaTrainingSAE,
    MatryoshkaTrainingSAEConfig,
    to_inference,
)
from sae_lens_matryoshka.activations import (
    TRAINING_ACTIVATION_CLASSES,
    BatchTopK,
    JumpReLU,
    ReLU,
    TopK,
)
from sae_lens_matryoshka.collectives import Collectives
from sae_lens_matryoshka.config import INFERENCE_ACTIVATIONS, TRAINING_ACTIVATIONS
from sae_lens_matryoshka.inference_activations import INFERENCE_ACTIVATION_CLASSES
from sae_lens_matryoshka.kernels import encoder_backward
from sae_lens_matryoshka.kernels.selection import Selection
from sae_lens_matryoshka.toy import short_run_trainer_config

from .conftest import (
    ACTIVATION_FIELDS,
    pin_kernel,
    small_sae_cfg,
    step_input,
    step_output,
    train_step,
)
from .fake_device import on_fake_device, to_fake_device

D_IN, D_SAE = 10, 64


def _sae(activation: str = "batchtopk", **fields: Any) -> MatryoshkaTrainingSAE:
    torch.manual_seed(0)
    base: dict[str, Any] = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "matryoshka_widths": [8, 24, D_SAE],
        "activation": activation,
        **ACTIVATION_FIELDS[activation],
    }
    base.update(fields)
    return MatryoshkaTrainingSAE(MatryoshkaTrainingSAEConfig(**base))


@pytest.mark.parametrize(
    ("activation", "kind", "state"),
    [
        ("batchtopk", BatchTopK, {"topk_threshold", "last_cutoff"}),
        ("topk", TopK, set()),
        ("jumprelu", JumpReLU, {"threshold"}),
        ("relu", ReLU, set()),
    ],
)
def test_each_activation_is_one_module_whose_state_keeps_saelens_names(
    activation: str, kind: type, state: set[str]
) -> None:
    sae = _sae(activation)
    assert type(sae.activation_fn) is kind is TRAINING_ACTIVATION_CLASSES[activation]
    # the config's table of activation kinds names what the saved SAE computes with
    assert TRAINING_ACTIVATION_CLASSES.keys() == TRAINING_ACTIVATIONS.keys()
    assert set(INFERENCE_ACTIVATION_CLASSES) == set(INFERENCE_ACTIVATIONS)
    saved_as = INFERENCE_ACTIVATION_CLASSES[TRAINING_ACTIVATIONS[activation].saved_as]
    assert type(to_inference(sae).activation_fn) is saved_as
    names = set(sae.state_dict())
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | state
    # the optimizer sees the thresholds a JumpReLU learns
    assert {name for name, _ in sae.named_parameters()} >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    other = _sae(activation)
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.add_(0.25)
    other.load_state_dict(sae.state_dict())
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, msg=name)


def test_sampled_prefixes_keep_their_generator_state_under_its_saved_name() -> None:
    sae = _sae(prefix_sampling="pareto", matryoshka_widths=[])
    assert "prefix_rng_state" in sae.state_dict()
    sae.to(torch.float64)
    assert sae.levels.prefix_rng_state.device.type == "cpu"  # never copied to the device


def test_thresholds_keep_their_precision_through_dtype_conversions() -> None:
    for activation, name, dtype in [
        ("batchtopk", "topk_threshold", torch.float64),
        ("batchtopk", "last_cutoff", torch.float64),
        ("jumprelu", "threshold", torch.float32),
    ]:
        sae = _sae(activation).to(torch.bfloat16)
        assert sae.W_enc.dtype == torch.bfloat16
        assert getattr(sae.activation_fn, name).dtype == dtype


def test_inference_activation_state_keeps_saelens_names(tmp_path) -> None:
    trained = _sae("jumprelu")
    trained.save_inference_model(tmp_path)
    loaded = MatryoshkaSAE.load_from_disk(tmp_path)
    assert set(loaded.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}


class RecordingCollectives(Collectives):
    """The single-process operations, recording each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def batch_topk(self, hidden_pre: torch.Tensor, k: float, count_on_host: bool) -> Selection:
        self.calls.append("batch_topk")
        return super().batch_topk(hidden_pre, k, count_on_host)

    def dead_everywhere(self, dead: torch.Tensor) -> torch.Tensor:
        self.calls.append("dead_everywhere")
        return super().dead_everywhere(dead)

    def minimum(self, value: torch.Tensor) -> torch.Tensor:
        self.calls.append("minimum")
        return super().minimum(value)


@pytest.mark.parametrize("training_path", ["sparse", "dense"])
def test_training_steps_use_the_injected_collectives_and_evaluation_does_not(
    training_path: str,
) -> None:
    sae = _sae(training_path=training_path)
    collectives = RecordingCollectives()
    sae.collectives = collectives
    x = torch.randn(32, D_IN)
    dead = torch.arange(D_SAE) % 5 == 0
    train_step(sae, x, dead)
    assert collectives.calls == ["dead_everywhere", "batch_topk", "minimum"]
    collectives.calls.clear()
    sae.eval()
    with torch.no_grad():
        step_output(sae, x, dead)
        sae.encode(x)
    assert collectives.calls == []
    sae.train()
    sae.encode(x)  # encode outside a training step: a single-process selection
    assert collectives.calls == []


class LargeTensors(TorchDispatchMode):
    """Records every op that puts a floating-point tensor of ``numel`` or more elements in new memory."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.layout == torch.strided
                and tensor.is_floating_point()
                and tensor.numel() >= self.numel
                and tensor.untyped_storage().data_ptr() not in self._storages
            ):
                self._storages.add(tensor.untyped_storage().data_ptr())
                self.shapes.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_a_sparse_step_builds_no_dense_activation_matrix(activation: str) -> None:
    """Forward and backward: the pre-activations are the only n_tokens x d_sae float tensor."""
    n_tokens, d_sae = 128, 1024
    sae = _sae(activation, d_sae=d_sae, matryoshka_widths=[64, 256, d_sae])
    x = torch.randn(n_tokens, D_IN)
    dead = torch.arange(d_sae) % 7 == 0
    recorder = LargeTensors(n_tokens * d_sae)
    with recorder:
        train_step(sae, x, dead)
    assert [shape for _, shape in recorder.shapes] == [(n_tokens, d_sae)], recorder.shapes
    dense = _sae(activation, d_sae=d_sae, matryoshka_widths=[64, 256, d_sae], training_path="dense")
    recorder = LargeTensors(n_tokens * d_sae)
    with recorder:
        train_step(dense, x, dead)
    assert len(recorder.shapes) > 3  # the control: the dense path builds several


aten = torch.ops.aten
#: ops whose result has a size or value the host must read: on a GPU, each waits for the device
_READ_BACK = {
    aten.nonzero.default,
    aten._local_scalar_dense.default,  # item(), bool(), int(), float(), a 0-d tensor as an index
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._coalesce.default,  # its number of distinct entries
}
#: ops that read back their result's size when one of their indices is a boolean mask
_INDEXING = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


class _DeviceReads(TorchDispatchMode):
    """Records every dispatched op whose result the host must read from the device."""

    def __init__(self, syncs: list[str]) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _READ_BACK:
            self.syncs.append(func.__name__ + _package_site())
        elif func in _INDEXING and any(
            isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
            for index in args[1]
        ):
            self.syncs.append(f"{func.__name__} (boolean mask)" + _package_site())
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.syncs.append(f"{func.__name__} (no output_size)" + _package_site())
        return func(*args, **kwargs)


@contextmanager
def _undispatched_reads(syncs: list[str]) -> Iterator[None]:
    """Records ``tolist`` and ``numpy``: of a CPU tensor they read its memory without an op.

    Patched on ``torch.Tensor`` itself: a ``TorchFunctionMode`` is not active
    in the backward pass, where a custom function's kernels run.
    """
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def recording(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            syncs.append(name + _package_site())
            return originals[name](self, *args, **kwargs)

        return read

    try:
        for name in originals:
            setattr(torch.Tensor, name, recording(name))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _package_site() -> str:
    """``"@file.py:function"`` of the innermost frame of the package: where a read was asked for."""
    for frame in reversed(traceback.extract_stack()):
        if "/sae_lens_matryoshka/" in frame.filename:
            return f"@{Path(frame.filename).name}:{frame.name}"
    return "@outside the package"


@contextmanager
def counted_host_syncs() -> Iterator[list[str]]:
    """The host synchronisations of what runs inside, as a GPU would make them (counted on CPU).

    Ops with a data-dependent size (``nonzero``, a boolean-mask index,
    ``masked_select``, ``unique``, ``coalesce``, ``repeat_interleave`` without
    ``output_size``) and reads of a value (``item``, ``bool``, ``float``, a
    0-d tensor as an index, ``tolist``), each as ``"op@file.py:function"``.
    """
    syncs: list[str] = []
    with _undispatched_reads(syncs), _DeviceReads(syncs):
        yield syncs


#: a step's one host read (``step.read_step_numbers``): the loss's finiteness, whether the
#: BatchTopK selection's estimate held, and the dead counts of every group, in one ``tolist``
ONE_READ = ["tolist@step.py:read_step_numbers"]
#: what a CPU run also counts for sampled prefixes: reading the drawn widths, which are a
#: CPU tensor wherever the SAE is (the sampler's generator is a CPU one: ``test_device``
#: checks that the step copies nothing else to its device), so no wait for a GPU
PREFIX_DRAW = ["tolist@levels.py:sample_prefix_widths"]


@pytest.mark.parametrize("dead_every", [5, None], ids=["dead", "none-dead"])
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"activation": "topk"},
        {"activation": "jumprelu"},
        {"activation": "relu"},
        {"activation": "jumprelu", "target_l0": 40.0},
        {"activation": "relu", "target_l0": 40.0},
        {"use_matryoshka_aux_loss": True},
        {"level_weights": [2.0, 1.0, 1.0]},
        {"prefix_sampling": "pareto", "n_sampled_prefixes": 4},
        {"activation": "topk", "prefix_sampling": "pareto", "use_matryoshka_aux_loss": True},
    ],
    ids=lambda fields: "-".join(f"{key}={value}" for key, value in fields.items()) or "default",
)
def test_a_steady_step_reads_from_the_device_once(
    fields: dict[str, Any], dead_every: int | None
) -> None:
    """Counted as a GPU would wait, over a step with or without dead latents in every group.

    Every activation, whole-SAE and per-level aux loss, fixed and sampled
    prefixes: one read, whatever the step needs on the host. The batch is
    large enough for BatchTopK's sampled threshold to run, and its sampled
    prefixes draw on the host (no read) and copy their bounds without waiting.
    """
    activation = fields.get("activation", "batchtopk")
    cfg = MatryoshkaTrainingSAEConfig(
        d_in=small_sae_cfg().d_in,
        d_sae=1024,
        matryoshka_widths=[64, 256, 1024],
        **{**ACTIVATION_FIELDS[activation], **fields},
    )
    torch.manual_seed(0)
    sae = MatryoshkaTrainingSAE(cfg)
    x = torch.randn(64, cfg.d_in)
    dead = None if dead_every is None else torch.arange(cfg.d_sae) % dead_every == 0
    train_step(sae, x, dead, l1=1.0, l0=1.0)  # the first step initialises b_dec, caches plans
    with counted_host_syncs() as syncs:
        out = sae.training_forward_pass(step_input(x, dead, logging=False, step=1, l1=1.0, l0=1.0))
        out.loss.backward()
    assert syncs == (PREFIX_DRAW if "prefix_sampling" in fields else []) + ONE_READ
    aux = float(out.losses["auxiliary_reconstruction_loss"].detach())
    assert aux > 0 if dead is not None else aux == 0  # dead latents trained


@pytest.mark.parametrize("dead_every", [5, None], ids=["dead", "none-dead"])
def test_the_bagged_encoder_gradient_reads_its_blocks_on_cpu_only(
    monkeypatch: pytest.MonkeyPatch, dead_every: int | None
) -> None:
    """On CPU it reads where each block of latents starts (CPU memory, no wait); elsewhere nothing.

    One read per ``W_enc`` gradient: the reconstruction's and the dead-latent
    loss's. On the stand-in device the same step reads once, as every step.
    """
    pin_kernel(monkeypatch, "encoder_weight_grad", "bagged")
    monkeypatch.setattr(encoder_backward, "BAG_BLOCK", 256)  # four blocks of 1024 latents
    cfg = MatryoshkaTrainingSAEConfig(d_in=16, d_sae=1024, k=8, matryoshka_widths=[64, 256, 1024])
    x = torch.randn(64, cfg.d_in, generator=torch.Generator().manual_seed(0))
    dead = None if dead_every is None else torch.arange(cfg.d_sae) % dead_every == 0
    torch.manual_seed(0)
    on_cpu = MatryoshkaTrainingSAE(cfg)
    on_device = to_fake_device(copy.deepcopy(on_cpu))

    def second_step_reads(sae: MatryoshkaTrainingSAE) -> list[str]:
        batch = x.to(sae.W_enc.device)
        mask = None if dead is None else dead.to(sae.W_enc.device)
        train_step(sae, batch, mask)
        with counted_host_syncs() as syncs:
            out = sae.training_forward_pass(step_input(batch, mask, logging=False, step=1))
            out.loss.backward()
        return syncs

    # one W_enc gradient over one or two sets of entries, each set's blocks read once
    sets = 1 if dead is None else 2
    block_reads = ["tolist@encoder_backward.py:in_blocks"] * sets
    assert sorted(second_step_reads(on_cpu)) == sorted(ONE_READ + block_reads)
    with on_fake_device():
        # (a stand-in tensor's tolist calls its CPU data's too: the one read counts twice)
        assert set(second_step_reads(on_device)) == set(ONE_READ)
    torch.testing.assert_close(on_device.W_enc.grad.cpu(), on_cpu.W_enc.grad)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
@pytest.mark.parametrize("activation", ["batchtopk", "topk", "jumprelu", "relu"])
def test_a_compiled_step_equals_the_eager_step(activation: str) -> None:
    """SAELens's ``compile_sae`` wraps ``training_forward_pass`` in ``torch.compile``.

    The compiled step (``aot_eager``: Dynamo's and AOT autograd's tracing of
    the step, our autograd functions and in-place threshold updates included,
    without a C++ compiler) gives the eager step's losses, gradients and
    activation state over several steps: the first, a logging one, one with
    dead latents.
    """
    eager = _sae(activation)
    traced = _sae(activation)
    compiled_step = torch.compile(traced.training_forward_pass, backend="aot_eager")
    dead = torch.arange(D_SAE) % 3 == 0
    for step, (mask, logging) in enumerate([(None, False), (dead, True), (dead, False)]):
        x = torch.randn(32, D_IN)
        inputs = step_input(x, mask, logging=logging, step=step, l1=1.0, l0=1.0)
        for sae in (eager, traced):
            sae.zero_grad()
        expected = eager.training_forward_pass(inputs)
        got = compiled_step(inputs)
        expected.loss.backward()
        got.loss.backward()
        assert got.losses.keys() == expected.losses.keys()
        for name, value in expected.losses.items():
            torch.testing.assert_close(got.losses[name], value, msg=f"{activation} {name}")
        for (name, param), compiled_param in zip(
            eager.named_parameters(), traced.parameters(), strict=True
        ):
            assert param.grad is not None and compiled_param.grad is not None, name
            torch.testing.assert_close(compiled_param.grad, param.grad, msg=f"{activation} {name}")
        for (name, state), compiled_state in zip(
            eager.activation_fn.state_dict().items(),
            traced.activation_fn.state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(compiled_state, state, msg=f"{activation} {name}")


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu"])
@pytest.mark.parametrize("logging", [False, True])
def test_the_trainer_keeps_no_unread_dense_tensor_of_a_step(activation: str, logging: bool) -> None:
    """SAELens's trainer holds a step's output through the next step: no ``n_tokens x d_sae`` in it.

    The pre-activations never stay; dense (``jumprelu``) activations stay
    only for a logging step, whose wandb log reads them after the step.
    """
    n_tokens, d_sae = 64, 256
    sae = _sae(activation, d_sae=d_sae, matryoshka_widths=[64, d_sae])
    batches = iter(lambda: torch.randn(n_tokens, D_IN), None)
    trainer_cfg = short_run_trainer_config(4, batch_size=n_tokens, lr=1e-3, dead_feature_window=1)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    trainer._is_logging_step = lambda: logging  # type: ignore[method-assign]
    for _ in range(2):  # the second with dead latents: every loss term runs
        output = trainer.step(next(batches))
        trainer.n_training_steps += 1
    dense = {
        name: tuple(value.shape)
        for name, value in vars(output).items()
        if isinstance(value, torch.Tensor)
        and not value.is_sparse
        and value.numel() >= n_tokens * d_sae
    }
    kept = {"feature_acts": (n_tokens, d_sae)} if logging and activation == "jumprelu" else {}
    assert dense == kept
    assert output.hidden_pre.shape == (0, d_sae)
    # what the trainer reads of the output still reads
    assert set(output.losses) >= {"mse_loss", "auxiliary_reconstruction_loss"}
    direct = sae.training_forward_pass(step_input(torch.randn(n_tokens, D_IN), step=2, l0=1.0))
    assert direct.hidden_pre.shape == (n_tokens, d_sae)  # called directly: everything returned
