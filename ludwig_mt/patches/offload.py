"""Gradient checkpointing that keeps each layer's saved input in host memory (the ``offload_checkpoints`` speed-up).

Why: with reentrant gradient checkpointing (what Ludwig enables) the only activation a decoder layer keeps
between its forward and its backward is its input, ``tokens x hidden`` in bf16: 16 layers x 16,320 tokens x
2,048 x 2 bytes = 1.07 GiB of a 5.3 GiB QLoRA step on the 1B shape, the largest item after the weights. unsloth's
"unsloth" checkpointing moves it to pinned host memory and back, overlapped with compute; that is its memory lead
at the same LoRA recipe (``bench/NOTES-speed.md``, "Against the peers"). torch's ``save_on_cpu`` does the same
but copies on the compute stream, so every copy (about 1 ms each way per layer on the H200) stalls the step.

:class:`HostOffloader` is a pair of saved-tensor hooks, used only around a checkpointed layer's call
(:func:`offloading`): the device-to-host copy runs on a side stream after the layer's input is ready; in the
backward, fetching one layer's input also starts the host-to-device copy of the layer that comes next (the one
saved before it), so the copy overlaps the current layer's recompute. Pinned buffers come from torch's caching
host allocator, which reuses them once their copies have finished. The values are the same bits: the test
compares losses and gradients with plain checkpointing.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

#: device types whose checkpointed inputs move to the host (the CPU test adds "cpu": a copy in host memory)
OFFLOAD_DEVICES: tuple[str, ...] = ("cuda",)


class Offloaded:
    """One checkpointed input while it lives in host memory (``host``), and its copy back once started."""

    __slots__ = ("host", "device", "copied", "fetched", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Any) -> None:
        self.host, self.device, self.copied = host, device, copied
        self.fetched: torch.Tensor | None = None
        self.ready: Any = None


class HostOffloader:
    """``pack``/``unpack`` hooks for ``torch.autograd.graph.saved_tensors_hooks`` (see the module docstring)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._saved: list[weakref.ReferenceType[Offloaded]] = []  # in the order of the forward

    def _side_stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, tensor: torch.Tensor) -> Offloaded | torch.Tensor:
        if tensor.device.type not in OFFLOAD_DEVICES:
            return tensor
        self._saved = [ref for ref in self._saved if ref() is not None]
        if not tensor.is_cuda:
            entry = Offloaded(tensor.detach().clone(), tensor.device, None)
        else:
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the layer's input has been computed
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                copied = stream.record_event()
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
            entry = Offloaded(host, tensor.device, copied)
        self._saved.append(weakref.ref(entry))
        return entry

    def _fetch(self, entry: Offloaded) -> None:
        """Start copying ``entry`` back to its device (on the side stream when on CUDA)."""
        if entry.fetched is not None:
            return
        if entry.device.type != "cuda":
            entry.fetched = entry.host.to(entry.device)
            return
        stream = self._side_stream(entry.device)
        with torch.cuda.stream(stream):
            stream.wait_event(entry.copied)
            entry.fetched = entry.host.to(entry.device, non_blocking=True)
            entry.ready = stream.record_event()

    def unpack(self, entry: Offloaded | torch.Tensor) -> torch.Tensor:
        if not isinstance(entry, Offloaded):
            return entry
        self._fetch(entry)
        tensor, entry.fetched = entry.fetched, None
        if entry.ready is not None:
            current = torch.cuda.current_stream(entry.device)
            current.wait_event(entry.ready)
            tensor.record_stream(current)
        self._prefetch_before(entry)
        return tensor

    def _prefetch_before(self, entry: Offloaded) -> None:
        """Start fetching the input saved just before ``entry``'s: the next one the backward asks for."""
        live = [ref() for ref in self._saved]
        if entry in live:
            index = live.index(entry)
            del self._saved[index]
            earlier = live[index - 1] if index > 0 else None
            if earlier is not None:
                self._fetch(earlier)


#: one per process: the hooks hold only weak references to what the graphs keep alive
OFFLOADER = HostOffloader()


def offloading(checkpoint: Callable[..., Any], enabled: Callable[[], bool]) -> Callable[..., Any]:
    """``checkpoint`` (a model's ``_gradient_checkpointing_func``, reentrant) with the tensors it saves (the layer's
    positional inputs) kept in host memory, when ``enabled()`` and an input lives on a device of
    :data:`OFFLOAD_DEVICES`."""
    if getattr(checkpoint, "_ludwig_mt_offloading", False):
        return checkpoint

    @functools.wraps(checkpoint)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        on_device = any(isinstance(a, torch.Tensor) and a.device.type in OFFLOAD_DEVICES for a in args)
        if not (on_device and enabled()):
            return checkpoint(function, *args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(OFFLOADER.pack, OFFLOADER.unpack):
            return checkpoint(function, *args, **kwargs)

    run._ludwig_mt_offloading = True
    return run


def offload_checkpointed_inputs(model: torch.nn.Module, enabled: Callable[[], bool]) -> int:
    """Wrap every ``_gradient_checkpointing_func`` of ``model``'s modules with :func:`offloading`; returns how many."""
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            module._gradient_checkpointing_func = offloading(func, enabled)
            wrapped += 1
    return wrapped
