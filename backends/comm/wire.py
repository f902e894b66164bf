"""The M2N message header: what travels in front of every message on every byte-stream transport.

A message is a tag (which layer / micro-batch / control word it belongs to) and a list of up to
MAX_PARTS tensors of any shape (empty ones included). The header is a fixed block of HEADER_WORDS int64:

  [MAGIC, seq, tag, nparts, payload_bytes, checksum, 0, 0,
   part 0: dtype code, ndim, shape[0..MAX_DIMS), ...]

`seq` counts the messages of one sender->receiver direction from 0, so a lost, repeated or garbled
message is caught at the receiver; `checksum` covers every other word, so a header garbled in
flight fails loudly instead of mis-sizing the payload.
"""
from __future__ import annotations

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
# Odd per-word weights for the checksum; slot 5 (the checksum itself) weighs nothing.
_WEIGHTS = (np.arange(HEADER_WORDS, dtype=np.int64) * 2 + 1) * np.int64(0x9E3779B1)
_WEIGHTS[5] = 0

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


def _checksum(words: np.ndarray) -> int:
    # Weighted sum of every word (wrapping int64 arithmetic, which numpy arrays do silently): any
    # single garbled word changes it.
    return int(np.dot(words, _WEIGHTS))


def encode_header(seq: int, tag: int, parts: list[PartSpec]) -> np.ndarray:
    """The header words for a message; raises on what the format cannot carry."""
    if len(parts) > MAX_PARTS:
        raise MscError(f"an M2N message carries at most {MAX_PARTS} tensors, got {len(parts)}")
    words = np.zeros(HEADER_WORDS, dtype=np.int64)
    words[0], words[1], words[2], words[3] = MAGIC, seq, tag, len(parts)
    words[4] = sum(p.nbytes for p in parts)
    for i, p in enumerate(parts):
        if p.dtype not in _CODE:
            raise MscError(f"an M2N message cannot carry dtype {p.dtype}; supported: {[str(d) for d in DTYPES]}")
        if len(p.shape) > MAX_DIMS:
            raise MscError(f"an M2N message carries tensors of at most {MAX_DIMS} dims, got shape {tuple(p.shape)}")
        base = FIXED_WORDS + i * PART_WORDS
        words[base], words[base + 1] = _CODE[p.dtype], len(p.shape)
        words[base + 2 : base + 2 + len(p.shape)] = p.shape
    words[5] = _checksum(words)
    return words


def decode_header(words: np.ndarray, expected_seq: int, peer: str) -> tuple[int, list[PartSpec]]:
    """(tag, parts) of a received header; CorruptMessage naming `peer` if any check fails."""
    w = words.tolist()  # python ints: much cheaper to pick apart than numpy scalars
    if w[0] != MAGIC:
        raise CorruptMessage(f"corrupted header from {peer}: bad magic {w[0]:#x}")
    if w[5] != _checksum(words):
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
        shape = tuple(w[base + 2 : base + 2 + ndim])
        if any(d < 0 for d in shape):
            raise CorruptMessage(f"corrupted header from {peer}: part {i} has shape {shape}")
        part = PartSpec(DTYPES[code], shape)
        size += part.nbytes
        parts.append(part)
    if size != total:
        raise CorruptMessage(f"corrupted header from {peer}: part sizes do not add up to {total} bytes")
    return tag, parts
