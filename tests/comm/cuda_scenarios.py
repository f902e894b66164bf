"""What the ranks of the cuda_ipc tests do, where tests.comm.scenarios builds CPU tensors (run through
tests.comm.harness on separate processes; every tensor here lives on the rank's current CUDA device)."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from msc.backends.comm import m2n, wire
from msc.errors import MscError
from tests.comm import scenarios


def _endpoint(rank: int, store, prefix: str, args: dict) -> m2n.Endpoint:
    return m2n.connect("cuda_ipc", rank, [1 - rank], store, timeout_s=args["timeout_s"], prefix=prefix, device="cuda",
                       buffer_bytes=args.get("buffer_bytes", 1 << 20))


def exchange_spread(rank: int, world: int, store, args: dict) -> dict:
    """scenarios.exchange with rank r on GPU r % device_count: the ring writes cross GPUs (peer access)."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    result = scenarios.exchange(rank, world, store, {**args, "transport": "cuda_ipc", "device": "cuda"})
    return {**result, "gpu": torch.cuda.current_device()}


def dies_midway(rank: int, world: int, store, args: dict) -> dict:
    """scenarios.dies_midway with CUDA tensors; rank 0 also checks that a CPU tensor is refused clearly."""
    ep = _endpoint(rank, store, "die", args)
    if rank == 1:
        ep.recv(0, 0)
        ep.send(0, [torch.ones(3, device="cuda")], 0)
        os._exit(3)
    try:
        ep.isend(1, [torch.zeros(3)], 5)
        cpu_error = None
    except MscError as e:
        cpu_error = str(e)
    ep.send(1, [torch.zeros(3, device="cuda")], 0)
    (back,) = ep.recv(1, 0)
    echo = bool(back.is_cuda and torch.equal(back.cpu(), torch.ones(3)))
    start = time.monotonic()
    try:
        ep.recv(1, 1)
        err = None
    except m2n.PeerError as e:
        err = str(e)
    return {"error": err, "seconds": time.monotonic() - start, "cpu_error": cpu_error, "echo": echo}


def corrupt_header(rank: int, world: int, store, args: dict) -> dict:
    """Rank 0 garbles the shape field of a header after its checksum; rank 1 must raise CorruptMessage."""
    ep = _endpoint(rank, store, "corrupt", args)
    if rank == 0:
        real = wire.encode_header_for

        def garbled(seq, tag, key):
            header = np.array(real(seq, tag, key))  # a writable copy, whatever encode_header_for returns
            header.view(np.int64)[wire.FIXED_WORDS + 2] += 1000  # first dim of part 0
            return header

        wire.encode_header_for = garbled
        ep.send(1, [torch.ones(4, 4, device="cuda")], 0)
        wire.encode_header_for = real
        ep.recv(1, 9, timeout=args["timeout_s"] * 4)  # rank 1's "done" note: the other direction is intact
        return {}
    try:
        ep.recv(0, 0)
        err = None
    except wire.CorruptMessage as e:
        err = str(e)
    ep.send(0, [torch.zeros(1, device="cuda")], 9)
    return {"error": err}


def borrow_and_release(rank: int, world: int, store, args: dict) -> dict:
    """Rank 0 sends 64 KB messages into rank 1's 1 MB ring. Phase 1, one message at a time: rank 1 releases
    each before the next comes, so all of them (4 MB in all) come as views of its ring. Phase 2: 12 sent at
    once, held before any is released: those that would take the uncredited part of the ring past half of
    it (the 9th on) are copied out instead. Every message is checked against what was sent."""
    ep = m2n.connect("cuda_ipc", rank, [1 - rank], store, timeout_s=args["timeout_s"], prefix="borrow", device="cuda",
                     buffer_bytes=1 << 20, borrow=True)
    dev = torch.device("cuda", torch.cuda.current_device())

    def message(i: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return [torch.randn(64, 256, generator=g).to(dev)]  # [64, 256] float32: 64 KB

    if rank == 0:
        for i in range(64):  # one at a time: rank 1 acknowledges each after releasing it
            ep.send(1, message(i), i)
            ep.recv(1, 1000 + i)
        sends = [ep.isend(1, message(i), i) for i in range(64, 76)]  # all at once
        ep.wait_all(sends)
        ep.recv(1, 999)  # rank 1's "done": the ring stays mapped until then
        return {}
    ring = ep._in[0].ring
    lo, hi = ring.data_ptr(), ring.data_ptr() + ring.numel()
    in_ring = lambda t: lo <= t.data_ptr() < hi  # noqa: E731
    lent1, ok = 0, True
    for i in range(64):
        h = ep.irecv(0, i)
        (got,) = h.wait()
        ok &= torch.equal(got.cpu(), message(i)[0].cpu())
        lent1 += in_ring(got)
        h.release()
        ep.send(0, [torch.zeros(1, device=dev)], 1000 + i)
    held = [ep.irecv(0, i) for i in range(64, 76)]
    got2 = [h.wait()[0] for h in held]
    lent2 = sum(in_ring(t) for t in got2)
    ok &= all(torch.equal(t.cpu(), message(i)[0].cpu()) for i, t in zip(range(64, 76), got2))
    for h in held:
        h.release()
    ep.send(0, [torch.zeros(1, device=dev)], 999)
    return {"ok": bool(ok), "lent1": lent1, "lent2": lent2}
