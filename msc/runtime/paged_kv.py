"""Paged KV cache of the attention role and the attention of one step over it.

The cache preallocates, per layer, a pool of fixed-size pages (blocks) of `page_size` tokens; each sequence
owns a list of blocks (its block table), grown as it gets longer and freed when it is dropped. A token at
position p of a sequence lives at flat slot  block_table[p // page_size] * page_size + p % page_size.

One step packs the new tokens of several sequences along T (as msc's attention op gives them). A
`StepMeta`, built on the host before the step, says where those tokens go (`slots`) and what each
sequence's context is (`block_tables`, `seq_lens`):
- decode (every sequence adds one token): K/V are written at `slots` and the Triton kernel
  (backends/compute/triton_attention.py) reads each context through the block tables. No host sync: a
  decode step can be captured in a CUDA graph, with a static StepMeta updated in place between replays.
- prefill (fresh sequences, no cached prefix): K/V are written at `slots` and causal attention runs on the
  step's own K/V with SDPA, sequences of equal length batched into one call.
- mixed (the engine's general step: chunks of prompts that continue a cached prefix, beside decode tokens,
  or attention sinks): K/V are written at `slots`, then each sequence's pages are gathered and its new
  queries attend causally over its whole context.

Nothing here grows with the square of a prompt: plain causal prefill is one SDPA call with is_causal (the
fused kernels, CPU's included, never build the [n, n] scores), and every path that needs an explicit mask
(a sliding window, a cached prefix, sinks) runs its queries in chunks small enough that the mask and the
scores of a chunk stay under ATTENTION_BYTES.
"""
from __future__ import annotations

import os

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from msc.errors import MscError
from msc.runtime.prefix_cache import PrefixIndex, extend_names
from msc.runtime.transfer import to_device

# NOTE: the most bytes one masked attention call may use for its mask and scores. Counted as a math backend
# would use them (float32 scores and probabilities of every head), the worst of SDPA's backends, so that the
# bound holds whichever one runs; at the default sizes (4096-token sequences, a few heads) no call is split.
# Measured on the CPU (16 heads, 4 KV heads, d 64): 4096 queries continuing a 12288-token prefix peaked at
# 9.7 GB in one call and at 1.3 GB in chunks; an 8192-token prefill with a 1024 window at 408 and 131 MB.
ATTENTION_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------- allocator
class BlockAllocator:
    """A free list of block ids 0..num_blocks-1. Allocation is all-or-nothing."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise MscError(f"BlockAllocator: num_blocks={num_blocks}; expected a positive number of blocks")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pops give 0, 1, 2, ... first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise MscError(f"BlockAllocator.allocate: asked for {n} blocks; expected n >= 0")
        if n > len(self._free):
            raise MscError(f"KV cache out of blocks: asked for {n}, {len(self._free)} free of {self.num_blocks} "
                           f"in all; drop finished sequences or give the cache more blocks")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        bad = [b for b in blocks if b not in self._used]
        if bad or len(set(blocks)) != len(blocks):
            raise MscError(f"BlockAllocator.free: blocks {bad or blocks} are not allocated (double free?); "
                           f"expected blocks returned by allocate()")
        self._used.difference_update(blocks)
        self._free.extend(reversed(blocks))


# ------------------------------------------------------------------------------------------- the cache
class PagedKVCache:
    """Preallocated paged K/V of all layers: k [L, num_blocks, page_size, nkv, d], v [L, ..., nkv, dv]."""

    def __init__(self, num_layers: int, num_blocks: int, page_size: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int, dtype: torch.dtype, device: torch.device | str, max_seq_len: int,
                 v_in_k: bool = False):
        if page_size <= 0 or max_seq_len <= 0:
            raise MscError(f"PagedKVCache: page_size={page_size}, max_seq_len={max_seq_len}; expected positive sizes")
        if v_in_k and v_head_dim > head_dim:
            raise MscError(f"PagedKVCache: values read from the keys' first {v_head_dim} entries, but keys have {head_dim}")
        self.num_layers, self.num_blocks, self.page_size = num_layers, num_blocks, page_size
        self.num_kv_heads, self.head_dim, self.v_head_dim = num_kv_heads, head_dim, v_head_dim
        self.dtype, self.device, self.max_seq_len = dtype, torch.device(device), max_seq_len
        self.max_blocks_per_seq = -(-max_seq_len // page_size)
        self.k = torch.empty(num_layers, num_blocks, page_size, num_kv_heads, head_dim, dtype=dtype, device=self.device)
        # NOTE: v_in_k (MLA's latent cache): a token's value is the first v_head_dim entries of its key (the
        # latent; the rotary part follows), so values are a view of the keys and cost no memory of their own
        self.v_in_k = v_in_k
        self.v = (self.k[..., :v_head_dim] if v_in_k else
                  torch.empty(num_layers, num_blocks, page_size, num_kv_heads, v_head_dim, dtype=dtype, device=self.device))
        self.allocator = BlockAllocator(num_blocks)
        self._blocks: dict[int, list[int]] = {}
        # NOTE: with prefix caching (enable_prefix_cache) a block may be held by several sequences: _refs counts
        # them, and a named block nobody holds stays in the pool as evictable (msc.runtime.prefix_cache)
        self._refs: dict[int, int] = {}
        self.prefix: PrefixIndex | None = None
        self._chains: dict[int, list[bytes]] = {}  # the names of a sequence's full pages hashed so far
        self._named: dict[int, int] = {}  # how many of a sequence's pages were offered to the index
        self._scratch: int | None = None
        # NOTE: every sequence's block table also lives in one row of a host int32 tensor, written as blocks
        # are added, so a step's tables are one row gather: built from Python lists they cost 3.4 ms a step
        # at 256 sequences of 4096 tokens (page 16), measured on this project's CPU VM
        self._row: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._table = torch.zeros(0, self.max_blocks_per_seq, dtype=torch.int32)  # [rows, max_blocks]
        # the state layers' per-sequence state (msc.runtime.sequence_state), when the model has state layers:
        # a slot taken and freed with the sequence, like its pages
        self.states = None
        # DeepSeek sparse attention's indexer keys [L, num_blocks, page_size, D] (msc.runtime.sparse_index), when the
        # model has an indexer: written at the same slots as the step's keys
        self.index_k = None

    # ---- sequences
    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self._blocks:
            raise MscError(f"PagedKVCache: sequence {seq_id} is already in the cache")
        self._blocks[seq_id] = []
        if not self._free_rows:  # grow the host table (doubling)
            old = self._table.shape[0]
            self._table = torch.cat([self._table, torch.zeros(max(old, 16), self.max_blocks_per_seq, dtype=torch.int32)])
            self._free_rows = list(range(self._table.shape[0] - 1, old - 1, -1))
        if self.states is not None:
            self.states.add(seq_id)
        row = self._row[seq_id] = self._free_rows.pop()
        self._table[row].zero_()

    def drop_sequence(self, seq_id: int, keep_names: bool = False) -> None:
        """Forget the sequence and let its blocks go (unknown ids are ignored): a block no other sequence holds
        returns to the free list, or, named in the prefix index, stays cached and evictable. keep_names: keep
        the hashes of its pages (a preempted sequence comes back with the same tokens)."""
        for block in self._blocks.pop(seq_id, []):
            left = self._refs[block] - 1
            if left:
                self._refs[block] = left
                continue
            del self._refs[block]
            if self.prefix is None or not self.prefix.park(block):
                self.allocator.free([block])
        self._named.pop(seq_id, None)
        if not keep_names:
            self._chains.pop(seq_id, None)
        if self.states is not None:
            self.states.drop(seq_id)
        row = self._row.pop(seq_id, None)
        if row is not None:
            self._free_rows.append(row)

    def blocks(self, seq_id: int) -> list[int]:
        if seq_id not in self._blocks:
            raise MscError(f"PagedKVCache: unknown sequence {seq_id}; call add_sequence({seq_id}) first")
        return self._blocks[seq_id]

    @property
    def blocks_in_use(self) -> int:
        """Blocks that sequences hold, each counted once (the scratch block and cached blocks nobody holds not
        counted)."""
        return len(self._refs)

    @property
    def num_free(self) -> int:
        """Blocks a sequence can get now: the free list and the cached blocks no sequence holds."""
        return self.allocator.num_free + (len(self.prefix.evictable) if self.prefix is not None else 0)

    def _allocate(self, n: int) -> list[int]:
        """n blocks for a sequence (cached blocks nobody holds evicted when the free list is short)."""
        self._free_up(n)
        new = self.allocator.allocate(n)
        for b in new:
            self._refs[b] = 1
        return new

    def _free_up(self, n: int) -> None:
        """Evict cached blocks nobody holds (least recently used first) until the free list has n, or none is left."""
        while self.prefix is not None and self.allocator.num_free < n and self.prefix.evictable:
            self.allocator.free([self.prefix.evict()])

    # ---- prefix caching
    def enable_prefix_cache(self) -> None:
        """Name full pages and attach them to later sequences that start with the same tokens."""
        if self.states is not None:
            raise MscError("prefix caching: this model has state layers (a sequence's recurrent state is not "
                           "held in pages, so a cached prefix would come without it)")
        if self.prefix is None:
            self.prefix = PrefixIndex()

    def reset_prefix_cache(self) -> int:
        """Forget every cached page that no sequence holds (they go back to the free list); the pages freed."""
        if self.prefix is None:
            return 0
        freed = self.prefix.clear_evictable()
        self.allocator.free(freed)
        return len(freed)

    def _chain(self, seq_id: int, pages: int, tokens_of) -> list[bytes]:
        """The names of the sequence's first `pages` full pages (extending the memo; tokens_of(start, n))."""
        return extend_names(self._chains.setdefault(seq_id, []), pages, self.page_size, tokens_of)

    def attach_prefix(self, seq_id: int, tokens: int, tokens_of) -> int:
        """For a fresh sequence of `tokens` tokens: attach the longest run of its full pages that the index holds
        (never the page of its last token, which must be computed for its logits); the tokens attached."""
        if self.prefix is None:
            return 0
        if self._blocks.get(seq_id):
            raise MscError(f"PagedKVCache.attach_prefix: sequence {seq_id} already holds pages")
        usable = (tokens - 1) // self.page_size
        names = self._chain(seq_id, usable, tokens_of)
        blocks = self.blocks(seq_id)
        for name in names[:usable]:
            block = self.prefix.block_of.get(name)
            if block is None:
                break
            self.prefix.take(block)
            self._refs[block] = self._refs.get(block, 0) + 1
            blocks.append(block)
        if blocks:
            self._table[self._row[seq_id], :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self._named[seq_id] = len(blocks)
        return len(blocks) * self.page_size

    def name_pages(self, seq_id: int, ready: int, tokens_of) -> None:
        """Offer the sequence's full pages among its first `ready` tokens (K/V written or queued, every token on
        the host) to the index."""
        if self.prefix is None or seq_id not in self._blocks:
            return
        full = min(ready // self.page_size, len(self._blocks[seq_id]))
        done = self._named.get(seq_id, 0)
        if full <= done:
            return
        names = self._chain(seq_id, full, tokens_of)
        blocks = self._blocks[seq_id]
        for i in range(done, full):
            self.prefix.name(blocks[i], names[i])
        self._named[seq_id] = full

    def capacity(self, seq_id: int) -> int:
        """Tokens the sequence's blocks hold."""
        return len(self.blocks(seq_id)) * self.page_size

    def ensure(self, seq_id: int, length: int) -> None:
        """Allocate blocks so that `length` tokens of the sequence fit."""
        if length > self.max_seq_len:
            raise MscError(f"PagedKVCache: sequence {seq_id} would hold {length} tokens; at most "
                           f"max_seq_len={self.max_seq_len} fit")
        blocks = self.blocks(seq_id)
        need = -(-length // self.page_size) - len(blocks)
        if need > 0:
            new = self._allocate(need)
            self._table[self._row[seq_id], len(blocks):len(blocks) + need] = torch.tensor(new, dtype=torch.int32)
            blocks.extend(new)

    @property
    def scratch_slot(self) -> int:
        """A slot no sequence owns (one block taken on first use): padding rows of a CUDA-graph batch write there."""
        if self._scratch is None:
            self._free_up(1)
            self._scratch = self.allocator.allocate(1)[0]
        return self._scratch * self.page_size

    # ---- addressing (host side, before a step)
    def slots(self, seq_ids: list[int], positions) -> Tensor:
        """Flat slot (block * page_size + offset) of each token: seq_ids[i] at positions[i] -> LongTensor [T]."""
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)  # [T]
        if len(seq_ids) != pos.numel():
            raise MscError(f"PagedKVCache.slots: {len(seq_ids)} sequence ids for {pos.numel()} positions; expected one each")
        if pos.numel() == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        uniq = list(dict.fromkeys(seq_ids))
        row_of = {s: i for i, s in enumerate(uniq)}
        return self._slots(self._host_table(uniq), [row_of[s] for s in seq_ids], pos, seq_ids).to(self.device)

    def _slots(self, table: Tensor, rows: list[int], pos: Tensor, seq_ids: list[int]) -> Tensor:
        """Host slots [T] of tokens at `pos` of the sequences in table's `rows` (their pages checked)."""
        n_blocks = torch.tensor([len(self._blocks[s]) for s in dict.fromkeys(seq_ids)])  # [U] in table row order
        rows_t = torch.tensor(rows)  # [T]
        page = pos // self.page_size  # [T]
        bad = (pos < 0) | (page >= n_blocks[rows_t])
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise MscError(f"PagedKVCache.slots: position {int(pos[i])} of sequence {seq_ids[i]} is outside its "
                           f"{self.capacity(seq_ids[i])} allocated tokens; call ensure() first")
        return table[rows_t, page].long() * self.page_size + pos % self.page_size  # [T]

    def block_table(self, seq_ids: list[int]) -> Tensor:
        """IntTensor [B, max_blocks_per_seq] on the cache device, unused entries 0."""
        return self._host_table(seq_ids).to(self.device)

    def _host_table(self, seq_ids: list[int]) -> Tensor:
        """The block tables of `seq_ids` [B, max_blocks] (unused entries 0), gathered from the host rows."""
        try:
            rows = [self._row[s] for s in seq_ids]
        except KeyError as e:
            raise MscError(f"PagedKVCache: unknown sequence {e.args[0]}; call add_sequence({e.args[0]}) first") from None
        return self._table[torch.tensor(rows, dtype=torch.long)]  # [B, max_blocks]

    # ---- device side
    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor | None) -> None:
        """Store k [T, nkv, d], v [T, nkv, dv] at `slots` [T] of `layer` (no host sync; graph-capturable).
        With v_in_k the values are part of the keys and `v` is not written."""
        kf = self.k[layer].view(-1, self.num_kv_heads, self.head_dim)  # [num_blocks * page, nkv, d]
        kf.index_copy_(0, slots, k.to(self.dtype))
        if not self.v_in_k:
            vf = self.v[layer].view(-1, self.num_kv_heads, self.v_head_dim)  # [num_blocks * page, nkv, dv]
            vf.index_copy_(0, slots, v.to(self.dtype))


# ------------------------------------------------------------------------------------------ step meta
@dataclass
class MixedParts:
    """A mixed step cut by kind: decode rows (their T indices and a decode meta of their own), fresh
    prompts (spans along T), and chunks continuing a cached prefix (start, n, total length, pages)."""

    decode_rows: Tensor  # [B_d] int64 indices along T
    decode: "StepMeta | None"
    fresh: list[tuple[int, int]]
    continuing: list[tuple[int, int, int, list[int]]]
    # the continuing chunks cut into batches for one attention call each (built at the first layer, reused by
    # the others): per sliding window, the batches and the spans too large for one
    batched: dict = field(default_factory=dict)


@dataclass
class StepMeta:
    """Where one step's tokens go and what each sequence's context is.

    slots [T] int64 (cache device): the flat slot of each new token.
    block_tables [B, max_blocks] int32, seq_lens [B] int32: each sequence's pages and length including this
    step's tokens. decode: every sequence adds exactly one token (T == B). prefill_spans (prefill only,
    host): (start along T, length) of each sequence.
    """

    slots: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    decode: bool
    prefill_spans: list[tuple[int, int]] = field(default_factory=list)
    mixed: "MixedParts | None" = None  # a mixed step's parts (for_step)
    state_slots: Tensor | None = None  # [B] int64 (cache device): each sequence's state slot (models with state layers)

    @classmethod
    def for_step(cls, cache: PagedKVCache, seq_ids: list[int], contexts: list[int], counts: list[int]) -> "StepMeta":
        """The general step: sequence i has contexts[i] tokens cached and adds counts[i] new ones (packed
        along T in this order); ensures the blocks. Pure decode and fresh-prefill steps get the layouts of
        for_decode / for_prefill; anything else is mixed: its decode rows still go through the decode
        kernel together, fresh prompts through the batched prefill, and chunks that continue a cached
        prefix gather their pages."""
        if len(seq_ids) != len(contexts) or len(seq_ids) != len(counts) or any(n <= 0 for n in counts):
            raise MscError(f"StepMeta.for_step: sequences {list(seq_ids)}, contexts {list(contexts)}, counts "
                           f"{list(counts)}; expected one context and one positive count per sequence")
        if all(n == 1 for n in counts):
            return cls.for_decode(cache, seq_ids, list(contexts))
        if all(c == 0 for c in contexts):
            return cls.for_prefill(cache, seq_ids, counts)
        spans, start, tok_seq, pos = [], 0, [], []
        dec_rows, dec_ids, dec_pos, fresh, cont = [], [], [], [], []
        for s, c, n in zip(seq_ids, contexts, counts):
            cache.ensure(s, c + n)
            spans.append((start, n))
            if n == 1 and c > 0:
                dec_rows.append(start)
                dec_ids.append(s)
                dec_pos.append(c)
            elif c == 0:
                fresh.append((start, n))
            else:
                cont.append((start, n, c + n, list(cache.blocks(s))))
            start += n
            tok_seq += [s] * n
            pos += range(c, c + n)
        lens = [c + n for c, n in zip(contexts, counts)]
        parts = MixedParts(
            torch.tensor(dec_rows, dtype=torch.long, device=cache.device),
            cls.for_decode(cache, dec_ids, dec_pos) if dec_ids else None, fresh, cont)
        return cls(cache.slots(tok_seq, pos), cache.block_table(list(seq_ids)),
                   torch.tensor(lens, dtype=torch.int32, device=cache.device), decode=False, prefill_spans=spans,
                   mixed=parts, state_slots=_state_slots(cache, seq_ids))

    @classmethod
    def for_decode(cls, cache: PagedKVCache, seq_ids: list[int], positions: list[int],
                   pad_to: int | None = None, on_host: bool = False) -> "StepMeta":
        """One new token per sequence at `positions` (0-based, so seq_len = position + 1); ensures the
        blocks. pad_to: pad the batch with rows of seq_len 0 writing to the cache's scratch slot (their
        output is 0), so one captured CUDA graph of batch `pad_to` serves smaller batches. on_host: keep the
        tensors on the host (pinned where the cache is on a GPU), for `update_` of a graph's static meta."""
        if len(seq_ids) != len(positions):
            raise MscError(f"StepMeta.for_decode: {len(seq_ids)} sequences, {len(positions)} positions; expected one each")
        pad = 0 if pad_to is None else pad_to - len(seq_ids)
        if pad < 0:
            raise MscError(f"StepMeta.for_decode: {len(seq_ids)} sequences do not fit pad_to={pad_to}")
        for s, p in zip(seq_ids, positions):
            cache.ensure(s, p + 1)
        host = cache._host_table(list(seq_ids))  # [B, max_blocks], built once for the slots and the table
        pos = torch.tensor(list(positions), dtype=torch.long)  # [B]
        slots = cache._slots(host, list(range(len(seq_ids))), pos, list(seq_ids)) if seq_ids else pos  # [B]
        lens = (pos + 1).to(torch.int32)  # [B]
        if pad:  # padded on the host, then one copy each to the device
            slots = torch.cat([slots, torch.full((pad,), cache.scratch_slot, dtype=torch.long)])
            host = torch.cat([host, torch.zeros(pad, host.shape[1], dtype=torch.int32)])
            lens = torch.cat([lens, torch.zeros(pad, dtype=torch.int32)])
        def place(t: Tensor) -> Tensor:
            if not on_host:
                return to_device(t, cache.device)
            return t.pin_memory() if cache.device.type == "cuda" else t

        states = _state_slots(cache, seq_ids, pad, on_host=True)
        return cls(place(slots), place(host), place(lens), decode=True,
                   state_slots=None if states is None else place(states))

    @classmethod
    def for_prefill(cls, cache: PagedKVCache, seq_ids: list[int], lengths: list[int]) -> "StepMeta":
        """Fresh sequences (no cached prefix), packed along T in the order given; ensures the blocks."""
        if len(seq_ids) != len(lengths) or any(n <= 0 for n in lengths):
            raise MscError(f"StepMeta.for_prefill: sequences {list(seq_ids)} with lengths {list(lengths)}; "
                           f"expected one positive length per sequence")
        spans, start = [], 0
        for s, n in zip(seq_ids, lengths):
            cache.ensure(s, n)
            spans.append((start, n))
            start += n
        tok_seq = [s for s, n in zip(seq_ids, lengths) for _ in range(n)]
        positions = torch.cat([torch.arange(n) for n in lengths])  # [T]
        slots = cache.slots(tok_seq, positions)  # [T]
        lens = torch.tensor(list(lengths), dtype=torch.int32, device=cache.device)  # [B]
        return cls(slots, cache.block_table(list(seq_ids)), lens, decode=False, prefill_spans=spans,
                   state_slots=_state_slots(cache, seq_ids))

    @classmethod
    def static(cls, cache: PagedKVCache, batch: int) -> "StepMeta":
        """A decode meta of `batch` padding rows (scratch slot, length 0) on the cache's device: the static
        input a CUDA graph reads, refreshed in place with `update_` before each replay."""
        dev = cache.device
        return cls(slots=torch.full((batch,), cache.scratch_slot, dtype=torch.long, device=dev),
                   block_tables=torch.zeros(batch, cache.max_blocks_per_seq, dtype=torch.int32, device=dev),
                   seq_lens=torch.zeros(batch, dtype=torch.int32, device=dev), decode=True,
                   state_slots=_state_slots(cache, [], batch))

    def update_(self, other: "StepMeta") -> "StepMeta":
        """Copy `other`'s tensor contents into this meta's tensors in place (a CUDA graph's static inputs)."""
        for name in ("slots", "block_tables", "seq_lens", "state_slots"):
            dst, src = getattr(self, name), getattr(other, name)
            if dst is None and src is None:
                continue
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise MscError(f"StepMeta.update_: {name} {src.dtype} {tuple(src.shape)} does not fit the static "
                               f"{dst.dtype} {tuple(dst.shape)}; build the step with the captured batch size (pad_to)")
            dst.copy_(src, non_blocking=True)
        self.decode, self.prefill_spans = other.decode, list(other.prefill_spans)
        return self

    def copy_into(self, static: "StepMeta") -> "StepMeta":
        """static.update_(self)."""
        return static.update_(self)


def _state_slots(cache: PagedKVCache, seq_ids, pad: int = 0, on_host: bool = False) -> Tensor | None:
    """[B + pad] int64 on the cache device (on_host: on the host): each sequence's state slot, padding rows the
    scratch slot; None when the model has no state layers."""
    if cache.states is None:
        return None
    st = cache.states
    slots = torch.tensor([st.slot(s) for s in seq_ids] + [st.scratch] * pad, dtype=torch.long)
    return slots if on_host else to_device(slots, cache.device)


# ------------------------------------------------------------------------------------------- attention
def paged_attention(cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, meta: StepMeta,
                    scaling: float, sliding_window: int, sinks: Tensor | None = None) -> Tensor:
    """q [1, nh, T, d], k [1, nkv, T, d], v [1, nkv, T, dv] -> [1, T, nh, dv] in q's dtype.

    Writes this step's K/V into the cache at meta.slots, then attends causally per sequence;
    sliding_window > 0 lets a query at position p see keys j with p - window < j <= p. `sinks` [nh]
    (GPT-OSS): one extra logit per head that joins the softmax and carries no value.
    """
    t = q.shape[2]
    if meta.slots.shape[0] != t:
        raise MscError(f"paged_attention: step has {t} tokens but meta has {meta.slots.shape[0]} slots")
    cache.write(layer, meta.slots, k[0].transpose(0, 1), v[0].transpose(0, 1))  # [T, nkv, d], [T, nkv, dv]
    if sinks is not None:
        # NOTE: decode steps with sinks take the Triton kernel (it starts each head's softmax from its sink)
        # where the head widths fit it; the batched prefill has no sinks, so other steps gather each
        # sequence's pages (correct everywhere, not the fast path), and decode steps the kernel does not fit
        # gather on the device only, so that a CUDA graph can still capture them.
        if meta.decode and _triton_runs(q) and _kernel_fits(cache):
            return _decode(cache, layer, q, meta, scaling, sliding_window, sinks)
        if meta.decode and _graph_safe_decode(q):
            return decode_on_device(cache, layer, q, meta, scaling, sliding_window, sinks)
        return _gathered(cache, layer, q, _spans_of(meta), scaling, sliding_window, sinks)
    if meta.decode:
        return _decode(cache, layer, q, meta, scaling, sliding_window)
    if meta.mixed is None:
        return _prefill(q, k, v, meta.prefill_spans, scaling, sliding_window)
    return _mixed(cache, layer, q, k, v, meta.mixed, scaling, sliding_window, _decode)


def _mixed(cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, parts: MixedParts, scaling: float,
           sliding_window: int, decode) -> Tensor:
    """A mixed step: decode rows through `decode` (the kernel of this cache's kind), fresh prompts through the
    batched prefill on the step's own k/v, chunks continuing a cached prefix over their gathered pages.
    q [1, nh, T, d], k/v the step's [1, nkv, T, d | dv] -> [1, T, nh, dv] (dv: the cache's value width)."""
    _, nh, t, _ = q.shape
    out = q.new_zeros(1, t, nh, cache.v_head_dim)  # [1, T, nh, dv]
    if parts.decode is not None:
        rows = parts.decode_rows  # [B_d]
        out[0, rows] = decode(cache, layer, q[:, :, rows], parts.decode, scaling, sliding_window)[0]
    if parts.fresh:
        _prefill(q, k, v, parts.fresh, scaling, sliding_window, out)
    if parts.continuing:
        if sliding_window not in parts.batched:
            parts.batched[sliding_window] = _chunk_batches(cache, parts.continuing, nh, q.shape[-1], sliding_window)
        batches, alone = parts.batched[sliding_window]
        for b in batches:
            _attend_batch(cache, layer, q, b, scaling, out)
        if alone:
            _gathered(cache, layer, q, alone, scaling, sliding_window, None, out)
    return out


@dataclass
class _ChunkBatch:
    """Chunks continuing a cached prefix, attended in one call: G chunks padded to Q queries and S keys."""

    q_rows: Tensor  # [G, Q] each query's row along T (a padding query repeats its chunk's last)
    blocks: Tensor  # [G, S] the page of each context position (padding: the chunk's first page)
    offsets: Tensor  # [G, S] ... and its offset in the page
    allowed: Tensor  # [G, 1, Q, S] bool: causal (and the window); padding keys never, padding queries as the last
    out_rows: Tensor  # [N] the real queries' rows along T
    pick: Tensor  # [N] their index in the flattened [G * Q]


def _chunk_batches(cache: PagedKVCache, spans, heads: int, head_dim: int, sliding_window: int):
    """Cut continuing chunks (start, n, total, pages) into batches whose gathered keys and values, mask and
    float32 scores stay under ATTENTION_BYTES; a chunk too large for a batch of its own is returned apart (it
    takes the query-chunked path). Built on the host once per step, then moved to the device.

    NOTE: with prefix caching most prompt chunks continue a cached prefix, often many in one step; attending to
    each apart costs several small launches (and a table copy) per chunk and layer. One call per batch keeps
    that per step, whatever the number of chunks."""
    kv_row = cache.num_kv_heads * (cache.head_dim + cache.v_head_dim) * cache.k.element_size()
    order = sorted(spans, key=lambda s: s[2])  # similar lengths together: less padding
    batches, alone, group = [], [], []

    def cost(g) -> int:
        q_max, s_max = max(s[1] for s in g), max(s[2] for s in g)
        return len(g) * (q_max * s_max * (heads * 4 * 2 + 1) + s_max * kv_row + q_max * heads * head_dim * 4)

    for span in order:
        if cost([span]) > ATTENTION_BYTES:
            alone.append(span)
        elif group and cost(group + [span]) > ATTENTION_BYTES:
            batches.append(group)
            group = [span]
        else:
            group.append(span)
    if group:
        batches.append(group)
    return [_chunk_batch(cache, g, sliding_window) for g in batches], alone


def _chunk_batch(cache: PagedKVCache, group, sliding_window: int) -> _ChunkBatch:
    page = cache.page_size
    q_max, s_max = max(n for _, n, _, _ in group), max(total for _, _, total, _ in group)
    g = len(group)
    q_rows = torch.zeros(g, q_max, dtype=torch.long)  # [G, Q]
    q_pos = torch.zeros(g, q_max, dtype=torch.long)  # [G, Q]
    blocks = torch.zeros(g, s_max, dtype=torch.long)  # [G, S]
    totals = torch.zeros(g, 1, dtype=torch.long)  # [G, 1]
    out_rows, pick = [], []
    k_pos = torch.arange(s_max)  # [S]
    for i, (start, n, total, table) in enumerate(group):
        idx = torch.arange(q_max).clamp(max=n - 1)  # [Q]: padding queries repeat the last
        q_rows[i] = start + idx
        q_pos[i] = total - n + idx
        pages = torch.tensor(table[: -(-total // page)], dtype=torch.long)
        blocks[i] = pages[(k_pos // page).clamp(max=len(pages) - 1)]
        totals[i] = total
        out_rows += range(start, start + n)
        pick += range(i * q_max, i * q_max + n)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < totals[:, :, None])  # [G, Q, S]
    if sliding_window > 0:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    dev = cache.device
    return _ChunkBatch(to_device(q_rows, dev), to_device(blocks, dev), to_device((k_pos % page).expand(g, -1).contiguous(), dev),
                       to_device(allowed[:, None], dev), to_device(torch.tensor(out_rows, dtype=torch.long), dev),
                       to_device(torch.tensor(pick, dtype=torch.long), dev))


def _attend_batch(cache: PagedKVCache, layer: int, q: Tensor, b: _ChunkBatch, scaling: float, out: Tensor) -> None:
    """One attention call for a batch of continuing chunks over their gathered contexts, into `out` [1, T, nh, dv]."""
    nh = q.shape[1]
    k = cache.k[layer][b.blocks, b.offsets].transpose(1, 2).to(q.dtype)  # [G, nkv, S, d]
    v = cache.v[layer][b.blocks, b.offsets].transpose(1, 2).to(q.dtype)  # [G, nkv, S, dv]
    qg = q[0][:, b.q_rows].transpose(0, 1)  # [G, nh, Q, d]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=b.allowed, scale=scaling, enable_gqa=True)  # [G, nh, Q, dv]
    out[0, b.out_rows] = o.transpose(1, 2).reshape(-1, nh, o.shape[-1])[b.pick]


def paged_mla_attention(cache: PagedKVCache, layer: int, q: Tensor, latent: Tensor, k_rot: Tensor, kv_b: Tensor,
                        meta: StepMeta, scaling: float, sliding_window: int, nope_dim: int, v_head_dim: int,
                        indices: Tensor | None = None) -> Tensor:
    """MLA over a latent cache (cache.v_in_k, one KV head of width r + dr, values its first r entries).

    q [1, nh, T, dn + dr], latent [1, 1, T, r], k_rot [1, 1, T, dr], kv_b [nh·(dn + dv), r] -> [1, T, nh, dv].
    Writes cat(latent, k_rot) at meta.slots. Keys of head h are cat(latent·W_k[h]ᵀ, k_rot) and values
    latent·W_v[h]ᵀ, so q·key = (q_nope·W_k[h])·latent + q_rot·k_rot: the query absorbs W_k, attention runs
    over the cached pairs as one shared head (values: the latent), and W_v is applied to its output.
    NOTE: a step of fresh prompts only (plain prefill) expands the step's own keys and values per head
    instead: over a whole prompt that costs nh·(dn + dr + dv) per pair, not nh·(2r + dr)."""
    nh, t, dn, dv = q.shape[1], q.shape[2], nope_dim, v_head_dim
    r = latent.shape[-1]
    if not cache.v_in_k or cache.num_kv_heads != 1 or cache.head_dim != r + k_rot.shape[-1] or cache.v_head_dim != r:
        raise MscError(f"paged_mla_attention: the cache is not a latent cache of width {r} + {k_rot.shape[-1]}")
    if meta.slots.shape[0] != t:
        raise MscError(f"paged_mla_attention: step has {t} tokens but meta has {meta.slots.shape[0]} slots")
    nkv = kv_b.shape[0] // (dn + dv)  # heads kv_b expands the latent to (fewer than nh: grouped, GLM-4-MoE-Lite)
    if nkv * (dn + dv) != kv_b.shape[0] or nh % nkv:
        raise MscError(f"paged_mla_attention: kv_b has {kv_b.shape[0]} rows, not a whole number of heads of {dn} + {dv} "
                       f"dividing the {nh} query heads")
    w = kv_b.reshape(nkv, dn + dv, r)  # per head: dn key rows, then dv value rows
    if nkv != nh:
        w = w.repeat_interleave(nh // nkv, dim=0)  # [nh, dn + dv, r]: query head h reads key/value head h // group
    w_k, w_v = w[:, :dn], w[:, dn:]  # [nh, dn, r], [nh, dv, r]
    pair = torch.cat([latent, k_rot], dim=-1)  # [1, 1, T, r + dr]
    cache.write(layer, meta.slots, pair[0].transpose(0, 1), None)
    if indices is not None:  # DeepSeek sparse attention: each query over the positions its indexer picked
        from msc.runtime.sparse_index import selected_attention

        if sliding_window > 0:
            raise MscError("paged_mla_attention: indexed sparse attention with a sliding window is not implemented")
        q_lat = torch.einsum("xhtd,hdr->xhtr", q[..., :dn], w_k)  # [1, nh, T, r]
        o = selected_attention(cache, layer, torch.cat([q_lat, q[..., dn:]], dim=-1), _spans_of(meta), indices, scaling)
        return torch.einsum("xthr,hvr->xthv", o, w_v)  # [1, T, nh, dv]
    if not meta.decode and meta.mixed is None:  # fresh prompts: expanded, on the step's own tokens
        k_nope = torch.einsum("tr,hdr->htd", latent[0, 0], w_k)  # [nh, T, dn]
        v = torch.einsum("tr,hdr->htd", latent[0, 0], w_v)  # [nh, T, dv]
        k = torch.cat([k_nope, k_rot[0].expand(nh, -1, -1)], dim=-1)  # [nh, T, dn + dr]
        return _prefill(q, k.unsqueeze(0), v.unsqueeze(0), meta.prefill_spans, scaling, sliding_window)
    q_lat = torch.einsum("xhtd,hdr->xhtr", q[..., :dn], w_k)  # [1, nh, T, r]
    q_abs = torch.cat([q_lat, q[..., dn:]], dim=-1)  # [1, nh, T, r + dr]
    if meta.decode:
        o = _mla_decode(cache, layer, q_abs, meta, scaling, sliding_window)  # [1, B, nh, r]
    else:  # mixed: fresh prompts and continued chunks absorbed as well (one shared head, values the latent)
        o = _mixed(cache, layer, q_abs, pair, latent, meta.mixed, scaling, sliding_window, _mla_decode)  # [1, T, nh, r]
    return torch.einsum("xthr,hvr->xthv", o, w_v)  # [1, T, nh, dv]


def _mla_decode(cache: PagedKVCache, layer: int, q_abs: Tensor, meta: StepMeta, scaling: float,
                sliding_window: int) -> Tensor:
    """One absorbed query per sequence over its latent pages: q_abs [1, nh, B, r + dr] -> [1, B, nh, r]. On a GPU
    (or under the Triton interpreter) the latent decode kernel; on a CPU each sequence's pages gathered."""
    if not _triton_runs(q_abs):
        return _gathered(cache, layer, q_abs, _spans_of(meta), scaling, sliding_window, None)
    from msc.backends.compute.triton_mla import paged_mla_decode

    return paged_mla_decode(q_abs[0].transpose(0, 1), cache.k[layer], meta.block_tables, meta.seq_lens,
                            cache.v_head_dim, scaling, sliding_window).unsqueeze(0)  # [1, B, nh, r]


def _spans_of(meta: StepMeta) -> list[tuple[int, int, int, list[int]]]:
    """(start along T, new tokens, total length, pages) of every sequence of a step (read on the host)."""
    lens, tables = meta.seq_lens.tolist(), meta.block_tables.tolist()
    spans = meta.prefill_spans or [(i, 1) for i in range(len(lens))]
    return [(start, n, total, table) for (start, n), total, table in zip(spans, lens, tables)]


def _gathered(cache: PagedKVCache, layer: int, q: Tensor, spans, scaling: float, sliding_window: int,
              sinks: Tensor | None, out: Tensor | None = None) -> Tensor:
    """The new queries of each span (start along T, n, total length, pages) over the sequence's whole cached
    context (its pages gathered), causal with the window; written into `out` [1, T, nh, dv]."""
    _, nh, t, _ = q.shape
    page = cache.page_size
    if out is None:
        out = q.new_zeros(1, t, nh, cache.v_head_dim)  # [1, T, nh, dv]
    for start, n, total, table in spans:
        if total == 0:
            continue  # a padding row
        blocks = torch.tensor(table[: -(-total // page)], dtype=torch.long, device=cache.device)
        k = cache.k[layer][blocks].reshape(-1, cache.num_kv_heads, cache.head_dim)[:total].transpose(0, 1)  # [nkv, S, d]
        v = cache.v[layer][blocks].reshape(-1, cache.num_kv_heads, cache.v_head_dim)[:total].transpose(0, 1)  # [nkv, S, dv]
        qs = q[0, :, start : start + n]  # [nh, n, d]
        k, v = k.to(qs.dtype), v.to(qs.dtype)
        # queries [a, b) of the span sit at positions total - n + a ..; keys after the chunk's last are never seen
        for a, b in _query_chunks(n, nh, total, sinks is not None):
            q_pos = torch.arange(total - n + a, total - n + b, device=q.device)[:, None]  # [b - a, 1]
            lo, hi = _visible_keys(total - n + a, total - n + b, sliding_window)
            k_pos = torch.arange(lo, hi, device=q.device)[None, :]  # [1, hi - lo]
            allowed = _causal_window(q_pos, k_pos, sliding_window)  # [b - a, hi - lo]
            kc, vc = k[:, lo:hi], v[:, lo:hi]
            if sinks is None:
                o = F.scaled_dot_product_attention(qs[:, a:b], kc, vc, attn_mask=allowed, scale=scaling,
                                                   enable_gqa=True)  # [nh, b - a, dv]
            else:
                o = attention_with_sinks(qs[:, a:b], kc, vc, allowed, scaling, sinks)
            out[0, start + a : start + b] = o.transpose(0, 1)
    return out


def _graph_safe_decode(q: Tensor) -> bool:
    """Whether decode steps with sinks take the device-only path (on a GPU: it may be in a CUDA graph)."""
    return q.device.type == "cuda"


def decode_on_device(cache: PagedKVCache, layer: int, q: Tensor, meta: StepMeta, scaling: float,
                     sliding_window: int, sinks: Tensor | None) -> Tensor:
    """Decode attention (one query per sequence) over every sequence's pages, gathered with device ops only:
    no host read of the step's lengths or pages, so a CUDA graph can capture it. q [1, nh, B, d] -> [1, B, nh, dv].
    NOTE: it reads every page of the block table (padded width), so it costs more than the Triton kernel;
    it serves the models that kernel does not (attention sinks)."""
    b, nh, d = q.shape[2], q.shape[1], q.shape[3]
    nkv = cache.num_kv_heads
    blocks = meta.block_tables.long()  # [B, P]
    k = cache.k[layer][blocks].reshape(b, -1, nkv, cache.head_dim)  # [B, S, nkv, d]
    v = cache.v[layer][blocks].reshape(b, -1, nkv, cache.v_head_dim)  # [B, S, nkv, dv]
    qg = q[0].transpose(0, 1).reshape(b, nkv, nh // nkv, d)  # [B, nkv, g, d]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhgd,bshd->bhgs", qg.to(work), k.to(work)) * scaling  # [B, nkv, g, S]
    lens = meta.seq_lens.long()[:, None]  # [B, 1]
    key_pos = torch.arange(k.shape[1], device=q.device)[None, :]  # [1, S]
    visible = key_pos < lens  # [B, S]: the query sits at position lens - 1
    if sliding_window > 0:
        visible &= key_pos > lens - 1 - sliding_window
    visible |= (key_pos == 0) & (lens == 0)  # padding rows (length 0) see one slot: finite, and discarded
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.to(work).reshape(1, nkv, nh // nkv, 1).expand(b, -1, -1, 1)  # [B, nkv, g, 1]
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    # NOTE: pages past a sequence's end hold whatever was there (NaN included): 0 * NaN would leak, so zero them
    v = torch.where(visible[:, :, None, None], v.to(work), 0.0)  # [B, S, nkv, dv]
    out = torch.einsum("bhgs,bshd->bhgd", probs, v)  # [B, nkv, g, dv]
    return out.reshape(b, nh, -1).to(q.dtype).unsqueeze(0)  # [1, B, nh, dv]


def _query_chunks(n: int, heads: int, keys: int, sinks: bool = False) -> list[tuple[int, int]]:
    """[a, b) ranges covering n queries, each small enough that its attention over `keys` keys (mask and
    float32 scores and probabilities of `heads` heads) stays under ATTENTION_BYTES; one range when it fits."""
    per_row = keys * heads * 4 * (3 if sinks else 2) + keys * 5  # scores (+ the sinks' logits), the mask
    rows = max(1, ATTENTION_BYTES // per_row)
    return [(a, min(n, a + rows)) for a in range(0, n, rows)]


def _visible_keys(first_q: int, end_q: int, sliding_window: int) -> tuple[int, int]:
    """The key positions [lo, hi) that queries at positions [first_q, end_q) may see."""
    lo = max(0, first_q - sliding_window + 1) if sliding_window > 0 else 0
    return lo, end_q


def _causal_window(q_pos: Tensor, k_pos: Tensor, sliding_window: int) -> Tensor:
    """Bool [Q, K]: key position j visible from query position i iff j <= i (and i - window < j with a window)."""
    allowed = k_pos <= q_pos
    if sliding_window > 0:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def attention_with_sinks(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scaling: float, sinks: Tensor) -> Tensor:
    """Softmax over [scores, sink] per head, the sink column dropped: q [nh, n, d], k/v [nkv, S, d] -> [nh, n, dv]."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # [nh, S, d]
    scores = (q @ k.transpose(1, 2)) * scaling  # [nh, n, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)  # [nh, n, 1]
    # the softmax runs in at least float32 (bf16/fp16 logits are upcast, float64 kept)
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(v.dtype)  # [nh, n, S]
    return probs @ v


def _triton_runs(q: Tensor) -> bool:
    """Whether the Triton decode kernels run for q. NOTE: Triton has no CPU backend (its interpreter is for
    tests): a CPU run gathers each sequence's pages and calls SDPA, one sequence at a time."""
    return q.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_fits(cache: PagedKVCache) -> bool:
    """Whether the Triton decode kernel takes this cache's head widths (powers of two, at least 16)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (cache.head_dim, cache.v_head_dim))


def _decode(cache: PagedKVCache, layer: int, q: Tensor, meta: StepMeta, scaling: float, sliding_window: int,
            sinks: Tensor | None = None) -> Tensor:
    if q.shape[2] != meta.seq_lens.shape[0]:
        raise MscError(f"paged_attention: a decode step needs one token per sequence; got {q.shape[2]} tokens "
                       f"for {meta.seq_lens.shape[0]} sequences")
    if not _triton_runs(q):
        return _gathered(cache, layer, q, _spans_of(meta), scaling, sliding_window, sinks)
    from msc.backends.compute.triton_attention import paged_decode_attention

    out = paged_decode_attention(q[0].transpose(0, 1), cache.k[layer], cache.v[layer], meta.block_tables,
                                 meta.seq_lens, scaling, sliding_window, sinks=sinks)  # [B, nh, dv]
    return out.unsqueeze(0)  # [1, T, nh, dv]


def _prefill(q: Tensor, k: Tensor, v: Tensor, spans: list[tuple[int, int]], scaling: float, sliding_window: int,
             out: Tensor | None = None) -> Tensor:
    """Causal SDPA per sequence on the step's own K/V (no cached prefix); equal lengths share one call.
    spans: (start along T, length) of fresh sequences; with `out` given they may cover part of T."""
    _, nh, t, _ = q.shape
    by_len: dict[int, list[int]] = defaultdict(list)
    for start, n in spans:
        by_len[n].append(start)
    if out is None:
        out = q.new_empty(1, t, nh, v.shape[-1])  # [1, T, nh, dv]
        if sum(n * len(s) for n, s in by_len.items()) != t:
            raise MscError(f"paged_attention: prefill spans {spans} do not cover the step's {t} tokens")
    for n, starts in by_len.items():
        # NOTE: one gather per group of equal lengths (index [G, n] of token rows) instead of G slices
        idx = torch.tensor([[s + i for i in range(n)] for s in starts], device=q.device)  # [G, n]
        qs = q[0][:, idx].transpose(0, 1)  # [G, nh, n, d]
        ks, vs = k[0][:, idx].transpose(0, 1), v[0][:, idx].transpose(0, 1)  # [G, nkv, n, d|dv]
        ks, vs = ks.to(qs.dtype), vs.to(qs.dtype)
        if sliding_window <= 0 or sliding_window >= n:
            # NOTE: plain causal: is_causal lets SDPA's fused kernels (flash on the CPU too) skip the [n, n]
            # scores (measured: 4.6 MB peak for n=4096, 4 heads, where the scores would take 256 MB)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=True)  # [G, nh, n, dv]
        else:
            o = qs.new_empty(*qs.shape[:-1], vs.shape[-1])  # [G, nh, n, dv]
            pos = torch.arange(n, device=q.device)
            # a chunk of queries sees at most n keys (fewer: its own and the window before them)
            for a, b in _query_chunks(n, len(starts) * nh, n):
                lo, hi = _visible_keys(a, b, sliding_window)
                mask = _causal_window(pos[a:b, None], pos[None, lo:hi], sliding_window)  # [b - a, hi - lo]
                o[:, :, a:b] = F.scaled_dot_product_attention(qs[:, :, a:b], ks[:, :, lo:hi], vs[:, :, lo:hi],
                                                              attn_mask=mask, scale=scaling, enable_gqa=True)
        out[0].index_copy_(0, idx.reshape(-1), o.transpose(1, 2).reshape(-1, nh, o.shape[-1]))
    return out
