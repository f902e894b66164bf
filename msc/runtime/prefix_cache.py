"""Automatic prefix caching: full KV pages found again by the tokens that filled them.

A full page of a sequence is named by a hash chained over its tokens and every token before it (the hash of
page i covers pages 0..i), so two sequences that start with the same tokens name their first pages alike,
and a page's name also fixes every position in it. When a request is admitted, the longest run of its full
pages that the index knows is attached to its block table instead of being computed again (their K/V are
the same numbers: same tokens, same positions, same model); the rest of its prompt is a chunk that
continues a cached prefix, which the mixed attention path already runs.

The index only names pages; `PagedKVCache` owns them and counts how many sequences hold each. A named page
that no sequence holds any more stays in the pool, evictable, and is reused least recently used first when
the free list runs dry, so caching never takes memory a running request needs.

NOTE: only pages whose every token is on the host and whose K/V a launched step writes are named (a token
sampled on the device and not yet read back, with overlapped steps, is not hashed until it lands). The last
page of a prompt is never attached: at least one token is always computed, for its logits.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

ROOT = b"msc-prefix-v1"


def chain(parent: bytes, tokens: list[int]) -> bytes:
    """The name of a page holding `tokens` after the prefix named `parent` (ROOT for the first page)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def extend_names(names: list[bytes], pages: int, page_size: int, tokens_of) -> list[bytes]:
    """Extend `names` (the names of a sequence's first pages, in order) to its first `pages` pages, in place;
    tokens_of(start, n) gives the sequence's tokens."""
    for i in range(len(names), pages):
        names.append(chain(names[-1] if names else ROOT, tokens_of(i * page_size, page_size)))
    return names


class PrefixIndex:
    """Page names -> blocks, and the named blocks that no sequence holds (least recently used first)."""

    def __init__(self) -> None:
        self.block_of: dict[bytes, int] = {}
        self.name_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.queried_tokens = 0  # prompt tokens looked up at admission
        self.hit_tokens = 0  # of those, found in the cache (not computed)

    def __len__(self) -> int:
        return len(self.block_of)

    def count(self, tokens: int, hit: int) -> None:
        """An admitted request: `tokens` looked up, `hit` of them found."""
        self.queried_tokens += tokens
        self.hit_tokens += hit

    def name(self, block: int, name: bytes) -> bool:
        """Name a block (False when another block already has that name: the first one stays the cached one)."""
        if name in self.block_of or block in self.name_of:
            return False
        self.block_of[name], self.name_of[block] = block, name
        return True

    def park(self, block: int) -> bool:
        """A named block that no sequence holds any more: keep it, evictable (False when it has no name)."""
        if block not in self.name_of:
            return False
        self.evictable[block] = None
        self.evictable.move_to_end(block)
        return True

    def take(self, block: int) -> None:
        """A sequence attaches a cached block: it is no longer evictable."""
        self.evictable.pop(block, None)

    def evict(self) -> int:
        """Forget the least recently parked block; the caller frees it."""
        block, _ = self.evictable.popitem(last=False)
        del self.block_of[self.name_of.pop(block)]
        return block

    def clear_evictable(self) -> list[int]:
        """Forget every evictable block (returned, for the caller to free)."""
        return [self.evict() for _ in range(len(self.evictable))]
