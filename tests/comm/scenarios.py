"""What the ranks of the transport tests do (run through tests.comm.harness on separate processes)."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from msc.backends.comm import m2n


def payload(src: int, dst: int, tag: int, nbytes: int, device="cpu") -> list[torch.Tensor]:
    """The tensors `src` sends `dst` under `tag`: deterministic, so the receiver can rebuild and compare."""
    g = torch.Generator().manual_seed(src * 1_000_003 + dst * 1009 + tag)
    rows = nbytes // (64 * 2)
    hidden = torch.randn(rows, 64, generator=g).to(torch.bfloat16)  # [n, 64] bf16: `nbytes` of activations
    ids = torch.randint(0, 8, (rows, 2), generator=g)  # [n, 2] int64
    odd = torch.randn(nbytes % 7, generator=g)  # a ragged float32 tail (0..6 elements)
    return [t.to(device) for t in (hidden, ids, odd)]


def _endpoint(transport: str, rank: int, peers: list[int], store, prefix: str, args: dict) -> m2n.Endpoint:
    host = args["hosts"][rank] if "hosts" in args else "127.0.0.1"  # tcp across network namespaces
    return m2n.connect(transport, rank, peers, store, timeout_s=args.get("timeout_s", 20.0), prefix=prefix,
                       device=args.get("device", "cpu"), buffer_bytes=args.get("buffer_bytes", 1 << 20), host=host,
                       borrow=args.get("borrow", False))


def _maybe_init_pg(transport: str, rank: int, world: int, store) -> None:
    if transport == "torch_dist" and not dist.is_initialized():
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))


def exchange(rank: int, world: int, store, args: dict) -> dict:
    """For each (M, N): M senders send every size to N receivers (tags in reverse order, so most
    messages arrive before they are asked for), receivers check them and answer with a derived tensor."""
    transport, device = args["transport"], args.get("device", "cpu")
    _maybe_init_pg(transport, rank, world, store)
    checked = 0
    for m, n in args["shapes"]:
        senders, receivers = list(range(m)), list(range(m, m + n))
        if rank not in senders + receivers:
            continue
        ep = _endpoint(transport, rank, receivers if rank < m else senders, store, f"x{m}{n}", args)
        tags = list(range(len(args["sizes"])))
        if rank in senders:
            sends = [ep.isend(d, payload(rank, d, t, args["sizes"][t], device), t) for t in reversed(tags) for d in receivers]
            for t in tags:
                for d in receivers:
                    (back,) = ep.recv(d, t)
                    expect = payload(rank, d, t, args["sizes"][t], device)[0].float().sum(dim=-1) * (d + 1)
                    assert torch.allclose(back, expect), f"reply from {d} tag {t} differs"
                    checked += 1
            ep.wait_all(sends)
        else:
            for t in tags:  # ask in tag order; they were sent in reverse
                for s in senders:
                    h = ep.irecv(s, t)
                    got = h.wait()
                    want = payload(s, rank, t, args["sizes"][t], device)
                    assert len(got) == len(want) and all(
                        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want)
                    ), f"message from {s} tag {t} ({args['sizes'][t]} bytes) differs"
                    ep.send(s, [got[0].float().sum(dim=-1) * (rank + 1)], t)
                    h.release()  # borrowed views (shm with borrow=True) give their ring space back here
                    checked += 1
        ep.close()
    return {"checked": checked}


def dies_midway(rank: int, world: int, store, args: dict) -> dict:
    """Rank 1 exits abruptly after one exchange; rank 0 must get a PeerError naming it, within the timeout."""
    transport = args["transport"]
    _maybe_init_pg(transport, rank, world, store)
    ep = _endpoint(transport, rank, [1 - rank], store, "die", args)
    if rank == 1:
        ep.recv(0, 0)
        ep.send(0, [torch.ones(3)], 0)
        os._exit(3)
    ep.send(1, [torch.zeros(3)], 0)
    ep.recv(1, 0)
    start = time.monotonic()
    try:
        ep.recv(1, 1)
    except m2n.PeerError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def silent_peer(rank: int, world: int, store, args: dict) -> dict:
    """Rank 1 stays alive but never sends: rank 0's wait must end with a PeerError after its timeout."""
    transport = args["transport"]
    _maybe_init_pg(transport, rank, world, store)
    ep = _endpoint(transport, rank, [1 - rank], store, "silent", args)
    if rank == 1:
        ep.recv(0, 7, timeout=args["timeout_s"] * 4)  # rank 0's "done" note, after its own wait failed
        return {}
    start = time.monotonic()
    try:
        ep.recv(1, 0, timeout=args["wait_s"])
        err = None
    except m2n.PeerError as e:
        err = str(e)
    ep.send(1, [torch.zeros(1)], 7)
    return {"error": err, "seconds": time.monotonic() - start}


def corrupt_header(rank: int, world: int, store, args: dict) -> dict:
    """Rank 0 garbles the shape field of a header on the wire; rank 1 must raise CorruptMessage."""
    from msc.backends.comm import wire

    transport = args["transport"]
    _maybe_init_pg(transport, rank, world, store)
    ep = _endpoint(transport, rank, [1 - rank], store, "corrupt", args)
    if rank == 0:
        real = wire.encode_header_bytes  # what every transport's header encoding goes through

        def garbled(seq, tag, key):
            buf, total = real(seq, tag, key)
            np.frombuffer(buf, dtype=np.int64)[wire.FIXED_WORDS + 2] += 1000  # first dim of part 0, after the checksum
            return buf, total

        wire.encode_header_bytes = garbled
        ep.isend(1, [torch.ones(4, 4)], 0)  # not waited: a torch_dist send completes only once received
        wire.encode_header_bytes = real
        ep.recv(1, 9, timeout=args["timeout_s"] * 4)  # rank 1's "done" note: the other direction is intact
        return {}
    try:
        ep.recv(0, 0)
        err = None
    except wire.CorruptMessage as e:
        err = str(e)
    ep.send(0, [torch.zeros(1)], 9)
    return {"error": err}
