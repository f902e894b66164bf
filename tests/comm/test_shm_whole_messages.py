"""The shm transport's whole-message path (put_message / take_message), in one process: messages that fit
are written with one position update and lent in place; those that wrap around the ring's end, arrive in
pieces or outgrow the ring take the general path. Every message must come out exact either way."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from msc.backends.comm import m2n, wire


def _pair(capacity: int, borrow: bool):
    """Endpoints of ranks 0 and 1 (each the other's only peer) in this process."""
    store, eps, errors = dist.HashStore(), {}, []

    def one(rank: int) -> None:
        try:
            eps[rank] = m2n.connect("shm", rank, [1 - rank], store, prefix="whole", timeout_s=10.0,
                                    buffer_bytes=capacity, borrow=borrow)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not errors and len(eps) == 2, errors
    return eps[0], eps[1]


def _message(i: int) -> list[torch.Tensor]:
    """Parts of awkward sizes and dtypes: an odd byte count first, so the parts after it are misaligned."""
    g = torch.Generator().manual_seed(i)
    return [
        torch.randint(0, 255, (i % 5 + 1,), dtype=torch.uint8, generator=g),  # 1..5 bytes
        torch.randn(3, 7, generator=g),  # float32
        torch.randn(2, 5, generator=g).to(torch.bfloat16),
        torch.randint(-9, 9, (i % 3, 4), generator=g),  # int64, sometimes empty
        torch.randn(64 * (i % 11), generator=g).to(torch.float16),  # 0..1.3 KB
    ]


@pytest.mark.parametrize("borrow", [True, False])
def test_messages_are_exact_across_many_ring_wraps(borrow):
    a, b = _pair(4096, borrow)  # a small ring: it wraps every few messages
    try:
        writes, lent = 0, 0
        ring = b.channels[0].inbound
        in_ring = lambda t: ring.base <= t.data_ptr() < ring.base + ring.capacity  # noqa: E731
        for i in range(300):
            sent = _message(i)
            h = a.isend(1, sent, tag=i)
            r = b.irecv(0, tag=i)
            got = b.wait_all([r, h])[0]
            assert [t.dtype for t in got] == [t.dtype for t in sent]
            assert all(torch.equal(x, y) for x, y in zip(got, sent)), f"message {i} differs"
            # aligned parts of a message are lent in place, also where it would have wrapped the ring's end
            # (it went to the ring's start behind a skip record); misaligned parts are copied
            aligned = [x for x, spec in zip(got, sent) if x.numel() and spec.dtype.itemsize == 1]
            lent += all(in_ring(x) for x in aligned)
            r.release()
            writes += wire.HEADER_BYTES + sum(t.nbytes for t in sent)
        assert ring.w_pos.value >= writes > 20 * ring.capacity  # every byte went through, many wraps
        assert ring.r_pos.value == ring.w_pos.value  # and every lent byte came back
        if borrow:
            assert lent == 300
    finally:
        a.close()
        b.close()


def test_whole_message_path_is_taken_when_it_fits_and_general_path_otherwise():
    a, b = _pair(1 << 16, True)
    try:
        ring_out, ring_in = a.channels[1].out, b.channels[0].inbound
        small = [torch.arange(1000, dtype=torch.float32)]  # 4 KB: fits, in one piece
        h = a.isend(1, small, tag=1)
        assert h.done and ring_out.w_pos.value == wire.HEADER_BYTES + 4000  # written whole inside isend
        r = b.irecv(0, tag=1)
        assert r.done and torch.equal(r.result[0], small[0])
        view_addr = r.result[0].data_ptr()
        assert ring_in.base <= view_addr < ring_in.base + ring_in.capacity  # lent in place, not copied
        r.release()
        big = [torch.randn(40_000)]  # 160 KB: larger than the 64 KB ring, streams through it
        h = a.isend(1, big, tag=2)
        assert not h.done
        r = b.irecv(0, tag=2)
        for _ in range(10_000):  # one thread drives both ends: each pass moves what the ring allows
            if r.done and h.done:
                break
            a.progress()
            b.progress()
        assert r.done and h.done
        got = r.result
        assert torch.equal(got[0], big[0])
        assert not (ring_in.base <= got[0].data_ptr() < ring_in.base + ring_in.capacity)  # copied out
        r.release()
    finally:
        a.close()
        b.close()


def test_a_garbled_header_read_in_place_is_a_clear_error():
    a, b = _pair(1 << 16, True)
    try:
        a.isend(1, [torch.ones(4)], tag=0)
        ring = b.channels[0].inbound
        ring.mv[16] ^= 0xFF  # the tag word, in the receiver's ring, after the checksum was computed
        with pytest.raises(wire.CorruptMessage, match="corrupted header from rank 0"):
            b.irecv(0, tag=0).wait(timeout=5.0)
    finally:
        a.close()
        b.close()


def test_skip_records_round_trip_and_a_garbled_one_is_a_clear_error():
    rec = wire.encode_skip(1234)
    assert len(rec) == wire.HEADER_BYTES and wire.skip_bytes(rec, "rank 0") == 1234
    header, _ = wire.encode_header_bytes(0, 7, ((torch.float32, (2, 3)),))
    assert wire.skip_bytes(header, "rank 0") is None  # a message header is not a skip record
    rec[32] ^= 0x01  # the pad word, after the checksum was computed
    with pytest.raises(wire.CorruptMessage, match="corrupted skip record from rank 0"):
        wire.skip_bytes(rec, "rank 0")
