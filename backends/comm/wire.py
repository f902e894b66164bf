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

import numpy as np
import torch

from msc.errors import MscError

MAGIC = 0x4D53434D324E3031  # "MSCM2N01" (fits in a signed int64)
SKIP_MAGIC = 0x50494B534D43534D  # "MSCSKIP" + "P": a skip record (see encode_skip)
MAX_PARTS = 8
MAX_DIMS = 4
PART_WORDS = 2 + MAX_DIMS
FIXED_WORDS = 8
HEADER_WORDS = FIXED_WORDS + MAX_PARTS * PART_WORDS  # 56 words
HEADER_BYTES = HEADER_WORDS * 8
MAX_PAYLOAD = 1 << 40
_CHECK_AT = 5 * 8  # byte offset of the checksum word
_ZERO8 = bytes(8)

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
_CODE = {dt: i for i, dt in enumerate(DTYPES)}


class CorruptMessage(MscError):
    """A header that fails its checks: the stream from that peer can no longer be trusted."""


class PartSpec:
    """One tensor of a message: dtype, shape and its byte count."""

    __slots__ = ("dtype", "shape", "nbytes")

    def __init__(self, dtype: torch.dtype, shape):
        self.dtype, self.shape = dtype, tuple(shape)
        n = dtype.itemsize
        for d in self.shape:
            n *= d
        self.nbytes = n

    def __eq__(self, other) -> bool:
        return isinstance(other, PartSpec) and (self.dtype, self.shape) == (other.dtype, other.shape)

    def __repr__(self) -> str:
        return f"PartSpec({self.dtype}, {self.shape})"


_FIXED = struct.Struct("<8q")
_PART_BYTES = HEADER_BYTES - FIXED_WORDS * 8
# NOTE: the part descriptions of a message repeat from step to step (same shapes, same dtypes), so
# both ends cache them: the sender keyed by (dtype, shape) pairs, the receiver by their packed bytes.
# The hot path is then one struct pack or unpack and one CRC: a few microseconds in CPython.
_CACHE_LIMIT = 4096
_encode_cache: dict[tuple, tuple[bytes, int]] = {}
_decode_cache: dict[bytes, tuple[list[PartSpec], int] | str] = {}


def _bytes_view(buf) -> memoryview:
    """A flat byte memoryview of any contiguous buffer (bytes, bytearray, numpy arrays, a ring's memoryview).
    NOTE: memoryview.cast costs ~1.5 us; a view that already is flat bytes (the shm rings') skips it."""
    if type(buf) is memoryview and buf.format == "B" and buf.ndim == 1:
        return buf
    return memoryview(buf).cast("B")


def _crc(buf) -> int:
    """CRC-32 of a header with its checksum word taken as zero."""
    mv = _bytes_view(buf)
    return zlib.crc32(mv[_CHECK_AT + 8 :], zlib.crc32(_ZERO8, zlib.crc32(mv[:_CHECK_AT])))


def _pack_parts(key: tuple) -> tuple[bytes, int]:
    if len(key) > MAX_PARTS:
        raise MscError(f"an M2N message carries at most {MAX_PARTS} tensors, got {len(key)}")
    words, total = [], 0
    for dtype, shape in key:
        code = _CODE.get(dtype)
        if code is None:
            raise MscError(f"an M2N message cannot carry dtype {dtype}; supported: {[str(d) for d in DTYPES]}")
        if len(shape) > MAX_DIMS:
            raise MscError(f"an M2N message carries tensors of at most {MAX_DIMS} dims, got shape {tuple(shape)}")
        words += [code, len(shape), *shape, *([0] * (MAX_DIMS - len(shape)))]
        total += PartSpec(dtype, shape).nbytes
    words += [0] * (MAX_PARTS * PART_WORDS - len(words))
    return struct.pack(f"<{len(words)}q", *words), total


def encode_header_bytes(seq: int, tag: int, key: tuple) -> tuple[bytearray, int]:
    """(header [HEADER_BYTES], payload bytes) for a message whose parts are `key`: ((dtype, shape), ...)."""
    packed = _encode_cache.get(key)
    if packed is None:
        packed = _pack_parts(key)
        if len(_encode_cache) >= _CACHE_LIMIT:
            _encode_cache.clear()
        _encode_cache[key] = packed
    parts, total = packed
    buf = bytearray(_FIXED.pack(MAGIC, seq, tag, len(key), total, 0, 0, 0) + parts)
    struct.pack_into("<q", buf, _CHECK_AT, _crc(buf))
    return buf, total


def encode_skip(pad: int) -> bytearray:
    """A skip record: a header-sized block that tells the receiver to pass over itself and the next `pad`
    bytes (no message, no sequence number). Ring transports write one where a message would wrap around
    the ring's end, so that the message starts again at the ring's start, in one piece."""
    buf = bytearray(_FIXED.pack(SKIP_MAGIC, 0, 0, 0, pad, 0, 0, 0) + bytes(HEADER_BYTES - FIXED_WORDS * 8))
    struct.pack_into("<q", buf, _CHECK_AT, _crc(buf))
    return buf


_SKIP_PREFIX = struct.pack("<q", SKIP_MAGIC)


def skip_bytes(buf, peer: str) -> int | None:
    """The bytes a skip record says to pass over after itself; None when `buf` is not a skip record."""
    buf = _bytes_view(buf)
    if buf[:8] != _SKIP_PREFIX:
        return None
    magic, seq, tag, nparts, pad, check = _FIXED.unpack_from(buf)[:6]
    if check != _crc(buf) or nparts or not 0 <= pad <= MAX_PAYLOAD:
        raise CorruptMessage(f"corrupted skip record from {peer}: {pad} bytes, {nparts} parts")
    return pad


def encode_header_for(seq: int, tag: int, key: tuple) -> np.ndarray:
    """Header bytes (uint8 [HEADER_BYTES]) for a message whose parts are `key`: ((dtype, shape), ...)."""
    return np.frombuffer(encode_header_bytes(seq, tag, key)[0], dtype=np.uint8)


def encode_header(seq: int, tag: int, parts: list[PartSpec]) -> np.ndarray:
    """The header bytes (uint8 [HEADER_BYTES]) for a message; raises on what the format cannot carry."""
    return encode_header_for(seq, tag, tuple((p.dtype, tuple(p.shape)) for p in parts))


def _unpack_parts(raw: bytes, nparts: int) -> tuple[list[PartSpec], int] | str:
    """The parts described by `raw`, or what is wrong with them."""
    w = struct.unpack(f"<{MAX_PARTS * PART_WORDS}q", raw)
    parts, size = [], 0
    for i in range(nparts):
        base = i * PART_WORDS
        code, ndim = w[base], w[base + 1]
        if not 0 <= code < len(DTYPES) or not 0 <= ndim <= MAX_DIMS:
            return f"part {i} has dtype code {code}, {ndim} dims"
        shape = w[base + 2 : base + 2 + ndim]
        if any(d < 0 for d in shape):
            return f"part {i} has shape {shape}"
        part = PartSpec(DTYPES[code], shape)
        size += part.nbytes
        parts.append(part)
    return parts, size


def decode_header(buf, expected_seq: int, peer: str) -> tuple[int, list[PartSpec]]:
    """(tag, parts) of a received header (HEADER_BYTES bytes); CorruptMessage naming `peer` if a check fails."""
    tag, parts, _ = decode_header_sized(buf, expected_seq, peer)
    return tag, parts


def decode_header_sized(buf, expected_seq: int, peer: str) -> tuple[int, list[PartSpec], int]:
    """(tag, parts, payload bytes) of a received header; see decode_header."""
    buf = _bytes_view(buf)  # any contiguous buffer: bytes, uint8 or int64 arrays
    magic, seq, tag, nparts, total, check = _FIXED.unpack_from(buf)[:6]
    if magic != MAGIC:
        raise CorruptMessage(f"corrupted header from {peer}: bad magic {magic:#x}")
    if check != _crc(buf):
        raise CorruptMessage(f"corrupted header from {peer}: checksum mismatch")
    if seq != expected_seq:
        raise CorruptMessage(f"corrupted stream from {peer}: message #{seq} arrived, expected #{expected_seq}")
    if not 0 <= nparts <= MAX_PARTS or not 0 <= total <= MAX_PAYLOAD:
        raise CorruptMessage(f"corrupted header from {peer}: {nparts} parts, {total} bytes")
    raw = bytes(buf[FIXED_WORDS * 8 :]) + bytes([nparts])
    got = _decode_cache.get(raw)
    if got is None:
        got = _unpack_parts(raw[:-1], nparts)
        if len(_decode_cache) >= _CACHE_LIMIT:
            _decode_cache.clear()
        _decode_cache[raw] = got
    if isinstance(got, str):
        raise CorruptMessage(f"corrupted header from {peer}: {got}")
    parts, size = got
    if size != total:
        raise CorruptMessage(f"corrupted header from {peer}: part sizes do not add up to {total} bytes")
    return tag, list(parts), total
