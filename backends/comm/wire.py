"""The M2N message header: what travels in front of every message on every byte-stream transport.

A message is a tag (which layer / micro-batch / control word it belongs to) and a list of up to
MAX_PARTS tensors of any shape (empty ones included). The header is a fixed block of HEADER_WORDS int64:

  [MAGIC, seq, tag, nparts, payload_bytes, crc32, 0, 0,
   part 0: dtype code, ndim, shape[0..MAX_DIMS), ...]

`seq` counts the messages of one sender->receiver direction from 0, so a lost, repeated or garbled
message is caught at the receiver; `checksum` covers every other word, so a header garbled in
flight fails loudly instead of mis-sizing the payload. Encoded and decoded with `struct` and `zlib.crc32`:
on the hot path of every message, these cost a microsecond or two where numpy scalars cost tens.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from msc.errors import MscError

MAGIC = 0x4D53434D324E3031  # "MSCM2N01" (fits in a signed int64)
MAX_PARTS = 8
MAX_DIMS = 4
PART_WORDS = 2 + MAX_DIMS
FIXED_WORDS = 8
HEADER_WORDS = FIXED_WORDS + MAX_PARTS * PART_WORDS  # 56 words
HEADER_BYTES = HEADER_WORDS * 8
MAX_PAYLOAD = 1 << 40
_HEADER = struct.Struct(f"<{HEADER_WORDS}q")
_CHECK_AT = 5 * 8  # byte offset of the checksum word
_ZERO8 = bytes(8)

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
_CODE = {dt: i for i, dt in enumerate(DTYPES)}


class CorruptMessage(MscError):
    """A header that fails its checks: the stream from that peer can no longer be trusted."""


@dataclass(frozen=True)
class PartSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def _crc(buf) -> int:
    """CRC-32 of a header with its checksum word taken as zero."""
    mv = memoryview(buf).cast("B")
    return zlib.crc32(mv[_CHECK_AT + 8 :], zlib.crc32(_ZERO8, zlib.crc32(mv[:_CHECK_AT])))


def encode_header(seq: int, tag: int, parts: list[PartSpec]) -> np.ndarray:
    """The header bytes (uint8 [HEADER_BYTES]) for a message; raises on what the format cannot carry."""
    if len(parts) > MAX_PARTS:
        raise MscError(f"an M2N message carries at most {MAX_PARTS} tensors, got {len(parts)}")
    words = [MAGIC, seq, tag, len(parts), sum(p.nbytes for p in parts), 0, 0, 0]
    for p in parts:
        code = _CODE.get(p.dtype)
        if code is None:
            raise MscError(f"an M2N message cannot carry dtype {p.dtype}; supported: {[str(d) for d in DTYPES]}")
        if len(p.shape) > MAX_DIMS:
            raise MscError(f"an M2N message carries tensors of at most {MAX_DIMS} dims, got shape {tuple(p.shape)}")
        words += [code, len(p.shape), *p.shape, *([0] * (MAX_DIMS - len(p.shape)))]
    words += [0] * (HEADER_WORDS - len(words))
    buf = bytearray(_HEADER.pack(*words))
    struct.pack_into("<q", buf, _CHECK_AT, _crc(buf))
    return np.frombuffer(buf, dtype=np.uint8)


def decode_header(buf, expected_seq: int, peer: str) -> tuple[int, list[PartSpec]]:
    """(tag, parts) of a received header (HEADER_BYTES bytes); CorruptMessage naming `peer` if a check fails."""
    buf = memoryview(buf).cast("B")  # any contiguous buffer: bytes, uint8 or int64 arrays
    w = _HEADER.unpack(buf)
    if w[0] != MAGIC:
        raise CorruptMessage(f"corrupted header from {peer}: bad magic {w[0]:#x}")
    if w[5] != _crc(buf):
        raise CorruptMessage(f"corrupted header from {peer}: checksum mismatch")
    seq, tag, nparts, total = w[1:5]
    if seq != expected_seq:
        raise CorruptMessage(f"corrupted stream from {peer}: message #{seq} arrived, expected #{expected_seq}")
    if not 0 <= nparts <= MAX_PARTS or not 0 <= total <= MAX_PAYLOAD:
        raise CorruptMessage(f"corrupted header from {peer}: {nparts} parts, {total} bytes")
    parts, size = [], 0
    for i in range(nparts):
        base = FIXED_WORDS + i * PART_WORDS
        code, ndim = w[base], w[base + 1]
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
            raise CorruptMessage(f"corrupted header from {peer}: part {i} has dtype code {code}, {ndim} dims")
        shape = w[base + 2 : base + 2 + ndim]
        if any(d < 0 for d in shape):
            raise CorruptMessage(f"corrupted header from {peer}: part {i} has shape {shape}")
        part = PartSpec(DTYPES[code], shape)
        size += part.nbytes
        parts.append(part)
    if size != total:
        raise CorruptMessage(f"corrupted header from {peer}: part sizes do not add up to {total} bytes")
    return tag, parts
