"""Stream-ordered flags in GPU memory: one process's kernel signals, another's waits, no host in between.

Two processes that share a GPU (or two GPUs with peer access) map each other's flag arrays through CUDA IPC.
`signal(flags, slot, value)` is a one-thread kernel that stores `value[0]` into `flags[slot]` with release
semantics at system scope, after every earlier kernel of its stream (stream order); `wait(flags, slot,
value)` is a one-thread kernel that spins (acquire loads) until `flags[slot] >= value[0]`, so the kernels
queued after it on its stream start only once the peer's signal has landed. Both are plain kernels, so a
CUDA graph can hold them: a role's whole decode step becomes one graph, its hand-offs included.

`value` is a one-element int64 device tensor the host sets before a step (the step's epoch): flags only
grow, so a slot never needs resetting and a late reader can never mistake an old signal for a new one.

Every wait has a deadline (`timeout_s`, read from the GPU's global timer): a wait that expires stores its
slot + 1 into `error[0]` and returns, later waits return at once while `error[0]` is set, and the host,
which reads `error` with the step's results, raises. A dead peer thus costs one timeout, never a hung
stream.

NOTE: on one GPU, a spinning kernel of one process only runs beside the other process's kernels under
MPS (`msc.runtime.mps`); without it the two CUDA contexts time-slice the GPU, and a spinning wait holds
its slice until the peer's next turn. The device exchange (msc.runtime.device_exchange) is therefore on
by default only under MPS or across GPUs.

`HostFlags` is the same interface on CPU tensors (Python loops, threads for peers), so the protocol built
on these flags is tested without a GPU.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from msc.errors import MscError

_kernels = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def _now(x):
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [x], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def signal_kernel(flag_ptr, value_ptr):
        v = tl.load(value_ptr)
        tl.atomic_xchg(flag_ptr, v, sem="release", scope="sys")

    @triton.jit
    def wait_kernel(flag_ptr, value_ptr, error_ptr, slot, timeout_ns):
        target = tl.load(value_ptr)
        failed = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu")  # an earlier wait of this role expired
        start = _now(target)
        cur = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        elapsed = start - start
        while (cur < target) & (elapsed < timeout_ns) & (failed == 0):
            cur = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            elapsed = _now(target) - start
        if (cur < target) & (failed == 0):
            tl.atomic_xchg(error_ptr, slot + 1, sem="release", scope="sys")

    return signal_kernel, wait_kernel


def _get():
    global _kernels
    if _kernels is None:
        _kernels = _build()
    return _kernels


class DeviceFlags:
    """Signal / wait kernels on int64 flag arrays in GPU memory (local or mapped from a peer)."""

    def __init__(self, error: Tensor, timeout_s: float):
        if error.dtype != torch.int64 or error.device.type != "cuda":
            raise MscError("DeviceFlags: the error word must be an int64 CUDA tensor")
        self.error, self.timeout_ns = error, int(timeout_s * 1e9)

    def signal(self, flags: Tensor, slot: int, value: Tensor) -> None:
        signal_kernel, _ = _get()
        signal_kernel[(1,)](flags[slot:], value, num_warps=1)

    def wait(self, flags: Tensor, slot: int, value: Tensor) -> None:
        _, wait_kernel = _get()
        wait_kernel[(1,)](flags[slot:], value, self.error, slot, self.timeout_ns, num_warps=1)


class HostFlags:
    """The same interface on CPU tensors shared between threads (for tests of the protocol without a GPU)."""

    def __init__(self, error: Tensor, timeout_s: float):
        self.error, self.timeout_s = error, timeout_s

    def signal(self, flags: Tensor, slot: int, value: Tensor) -> None:
        flags[slot] = int(value[0])

    def wait(self, flags: Tensor, slot: int, value: Tensor) -> None:
        if int(self.error[0]):
            return  # an earlier wait expired: the step is lost already, do not wait out another deadline
        target, deadline = int(value[0]), time.monotonic() + self.timeout_s
        while int(flags[slot]) < target:
            if time.monotonic() > deadline:
                self.error[0] = slot + 1
                return
            time.sleep(0)  # yield to the peer thread


def flags_for(device: torch.device, error: Tensor, timeout_s: float):
    """DeviceFlags on a GPU, HostFlags on the CPU."""
    return DeviceFlags(error, timeout_s) if device.type == "cuda" else HostFlags(error, timeout_s)
