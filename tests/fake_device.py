"""A stand-in accelerator for CPU-only CI: tensors that report another device and hold CPU data.

What a GPU run catches first is a tensor left on the CPU: an index, a
constant or a generator draw made without ``device=``, then mixed with the
SAE's tensors. On a CUDA build that is an error, or a silent host-to-device
copy that synchronises the stream. This module makes the same mistake fail
on a CPU-only machine. Inside :func:`on_fake_device`, every tensor created
for :data:`FAKE_DEVICE` (and every tensor of an SAE moved there with
:func:`to_fake_device`) is an :class:`OnFakeDevice`: it reports that device,
and computes with real CPU data underneath, so data-dependent steps (``nonzero``, ``.tolist()``,
``float(loss)``) run as they would on a GPU. An operation that mixes such a
tensor with a plain CPU tensor raises :class:`DeviceMismatch`, and so does a
random draw whose generator is on the other device. Explicit copies to the
device (``.to(device)``, ``torch.tensor(data, device=...)``, ``copy_``) are
allowed and recorded with their call site, marked ``(blocking)`` unless
asked for ``non_blocking``: on CUDA a blocking copy is a stream
synchronisation (a non-blocking one is not, from pinned memory).

Why not CUDA itself, faked: this torch build registers no CUDA device guard,
which autograd asks for on every tensor it records (an abort, not an error),
and ``FakeTensorMode`` with a CUDA device fails as soon as it creates a tensor;
its tensors have no data either, so a step's data-dependent shapes could not
run. The meta device has a guard, so :data:`FAKE_DEVICE` is ``meta``: to the
code under test it is simply a device that is not the CPU. Two things the code
asks of a real device are provided for it while the context is open: a
``torch.Generator(device=...)`` (a CPU generator that remembers the device it
was made for) and ``torch.autocast`` for its device type (the CPU's).

What it cannot check: code that asks for ``device.type == "cuda"`` takes its
other branch here (this package's step asks only ``torch.autocast``, above).

Stricter than CUDA: CUDA accepts a CPU scalar tensor in an elementwise
operation and a CPU index tensor when indexing, copying them over implicitly;
here both fail, since both are a tensor the step forgot to create on its device.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from unittest import mock

import torch
from sae_lens import SAE
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

#: the device the tensors report: not the CPU, with a device guard autograd can use
FAKE_DEVICE = torch.device("meta")
_CPU = torch.device("cpu")
AnySAE = TypeVar("AnySAE", bound=SAE[Any])


class DeviceMismatch(AssertionError):
    """An operation mixed the fake device's tensors with CPU tensors (or a CPU generator)."""


class OnFakeDevice(torch.Tensor):
    """A tensor on :data:`FAKE_DEVICE` whose data is the CPU tensor :attr:`cpu_data`."""

    cpu_data: torch.Tensor
    # the results of torch functions are built by __torch_dispatch__ below; the
    # default __torch_function__ would re-wrap plain (CPU) results as this class
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, cpu_data: torch.Tensor) -> OnFakeDevice:
        strided = cpu_data.layout == torch.strided  # sparse layouts have no strides, no offset
        return torch.Tensor._make_wrapper_subclass(
            cls,
            cpu_data.shape,
            strides=cpu_data.stride() if strided else None,
            storage_offset=cpu_data.storage_offset() if strided else None,
            dtype=cpu_data.dtype,
            layout=cpu_data.layout,
            device=FAKE_DEVICE,
            requires_grad=cpu_data.requires_grad,
        )

    def __init__(self, cpu_data: torch.Tensor) -> None:
        self.cpu_data = cpu_data

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnFakeDevice({self.cpu_data!r})"

    def tolist(self) -> Any:
        # a read back to the host, as on a GPU (torch refuses tolist on subclasses)
        return self.cpu_data.tolist()

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        # outside on_fake_device (a test reading results afterwards): same rules, nothing recorded
        return _run(func, args, kwargs or {}, None)


class FakeDeviceGenerator(torch.Generator):
    """A CPU generator that stands for one made on ``device`` (which this build may lack)."""

    fake_device: torch.device

    def __new__(cls, device: str | torch.device = "cpu") -> FakeDeviceGenerator:
        generator = super().__new__(cls)
        generator.fake_device = torch.device(device)
        return generator

    def __init__(self, device: str | torch.device = "cpu") -> None:
        del device  # set in __new__: torch.Generator's own __init__ takes nothing


class _FakeDeviceAutocast(torch.autocast):
    """``torch.autocast``, with the fake device's autocast being the CPU's."""

    def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
        if device_type == FAKE_DEVICE.type:
            device_type = _CPU.type
        super().__init__(device_type, *args, **kwargs)


@dataclass
class Transfers:
    """What :func:`on_fake_device` saw: the call site of every explicit copy to the device."""

    #: ``"file.py:function"`` of the innermost frame of the code under test, per copy
    host_to_device: list[str] = field(default_factory=list)


def _is_fake(device: Any) -> bool:
    return device is not None and torch.device(device) == FAKE_DEVICE


def _call_site() -> str:
    """The innermost frame outside torch and this module: the code that asked for the copy."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("fake_device.py"):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
    return "unknown"


def _run(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], seen: Transfers | None) -> Any:
    """``func`` on the CPU data of its arguments, its results on the device its inputs are on."""
    tensors = [
        leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
    ]
    on_fake = [isinstance(tensor, OnFakeDevice) for tensor in tensors]
    device = kwargs.get("device")
    if func is torch.ops.aten.copy_.default:  # ``dst.copy_(src)``: explicit, either way
        result_on_fake = on_fake[0]
        copies_to_device = on_fake[0] and not on_fake[1]
    else:
        if any(on_fake) and not all(on_fake):
            devices = [
                "fake" if fake else str(t.device) for t, fake in zip(tensors, on_fake, strict=True)
            ]
            raise DeviceMismatch(
                f"{func} mixes tensors on {FAKE_DEVICE} with CPU tensors (argument devices "
                f"{devices}), called from {_call_site()}: create the tensor on its device"
            )
        result_on_fake = _is_fake(device) if device is not None else any(on_fake)
        # ``.to(device)`` of a CPU tensor
        copies_to_device = func is torch.ops.aten._to_copy.default and result_on_fake
        copies_to_device = copies_to_device and not on_fake[0]
    if copies_to_device and seen is not None:
        blocking = "" if kwargs.get("non_blocking") else " (blocking)"
        seen.host_to_device.append(_call_site() + blocking)
    if _is_fake(device):
        kwargs = {**kwargs, "device": _CPU}
    wrappers = {id(t.cpu_data): t for t in tensors if isinstance(t, OnFakeDevice)}
    cpu_args, cpu_kwargs = pytree.tree_map_only(OnFakeDevice, lambda t: t.cpu_data, (args, kwargs))
    out = func(*cpu_args, **cpu_kwargs)

    def placed(result: Any) -> Any:
        if not isinstance(result, torch.Tensor):
            return result
        if id(result) in wrappers:  # an in-place operation returns its input
            return wrappers[id(result)]
        return OnFakeDevice(result) if result_on_fake else result

    return pytree.tree_map(placed, out)


class _FakeDeviceFunctions(TorchFunctionMode):
    """What the operations below cannot see: generators as created, and tensors made from data.

    A generator reaches ``__torch_dispatch__`` as a new Python object, without
    the device it was made for; ``torch.tensor(data, device=...)`` makes a
    plain meta tensor without dispatching a copy. Both are seen here, as called.
    """

    def __init__(self, seen: Transfers) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = [leaf for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)]
        # where the call computes: as asked, else where its first tensor is
        device = torch.device(kwargs.get("device") or (tensors[0].device if tensors else _CPU))
        generator = kwargs.get("generator")
        if generator is not None:
            generator_device = getattr(generator, "fake_device", generator.device)
            if generator_device != device:
                raise DeviceMismatch(
                    f"{func.__name__} draws on {device} from a generator on "
                    f"{generator_device}, called from {_call_site()}"
                )
        if func in _FROM_DATA and device == FAKE_DEVICE:
            data = args[1] if func is torch.Tensor.new_tensor else args[0]
            if not isinstance(data, OnFakeDevice):
                # made from host data: a copy from pageable memory, which waits
                self.seen.host_to_device.append(_call_site() + " (blocking)")
                cpu_args = pytree.tree_map_only(OnFakeDevice, lambda t: t.cpu_data, args)
                return OnFakeDevice(func(*cpu_args, **{**kwargs, "device": _CPU}))
        return func(*args, **kwargs)


#: tensors made from data (by default on the device of ``new_tensor``'s tensor), which torch
#: puts on the meta device without copying anything
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)


class _FakeDeviceMode(TorchDispatchMode):
    """Sees every operation, factories and copies of plain CPU tensors to the device included."""

    def __init__(self, seen: Transfers) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        return _run(func, args, kwargs or {}, self.seen)


@contextlib.contextmanager
def on_fake_device() -> Iterator[Transfers]:
    """Run the block with :data:`FAKE_DEVICE` as an accelerator; yields the copies it recorded."""
    seen = Transfers()
    with (
        mock.patch.object(torch, "Generator", FakeDeviceGenerator),
        mock.patch.object(torch, "autocast", _FakeDeviceAutocast),
        _FakeDeviceMode(seen),
        _FakeDeviceFunctions(seen),
    ):
        yield seen


def to_fake_device(sae: AnySAE) -> AnySAE:
    """Move ``sae`` to :data:`FAKE_DEVICE` as ``sae.to(device)`` would (its CPU data kept).

    SAELens's ``SAE.to`` also records the device in ``sae.device`` and ``sae.cfg.device``.
    """
    sae._apply(lambda tensor: OnFakeDevice(tensor.detach()))
    sae.device = FAKE_DEVICE
    sae.cfg.device = str(FAKE_DEVICE)
    return sae
