"""Host <-> device copies that do not wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory synchronises the stream: the host waits for
every kernel already queued. An engine that queues step n+1 while step n still runs (msc.engine.engine,
overlap) must never do that, so its step inputs go through `to_device` (pinned staging, then an asynchronous
copy) and its sampled tokens come back through `HostCopy` (an asynchronous copy into pinned memory with an
event to wait on later). On a CPU both are plain copies.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor `t` on `device`, queued on the current stream without a host sync."""
    if device.type != "cuda":
        return t.to(device)
    # NOTE: pin_memory() takes a block from torch's caching host allocator, which keeps it until the copy that
    # reads it has run (an event per block), so the staging buffer is never reused too early
    return t.pin_memory().to(device, non_blocking=True)


def tensor_to_device(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.tensor(values, dtype) on `device` without a host sync."""
    return to_device(torch.tensor(values, dtype=dtype), device)


class HostCopy:
    """Device tensors copied to the host in the background; `wait()` gives them (host tensors) once they landed."""

    def __init__(self, tensors: list[Tensor]):
        self._event = None
        if tensors and tensors[0].device.type == "cuda":
            self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.tensors = [t.cpu() for t in tensors]

    def wait(self) -> list[Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.tensors
