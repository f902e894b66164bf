"""The scheduler: which requests run in the next step, and how many of their tokens.

Every step (continuous batching, as vLLM's and SGLang's schedulers do):
1. running requests first, in the order they were admitted: a decoding request feeds its last token; a
   request still in its prompt feeds the next chunk that fits the step's token budget. Each gets the KV
   pages its new tokens need, on demand; when the pool is out of pages, the youngest running request is
   preempted (its pages freed; it is recomputed later from its prompt and the tokens it already made);
2. then waiting requests (preempted ones first, then by arrival) are admitted while the token budget,
   the batch limit and the free pages allow; a prompt longer than the budget goes in chunks over steps.
   With prefix caching a request admitted starts after the longest run of its full pages that is cached
   (msc.runtime.prefix_cache): those tokens cost neither compute nor new pages.
A finished or cancelled request's pages are freed at once (cached ones stay, evictable).

NOTE: preemption picks the youngest (last admitted) request: it has the least work to lose, and the
oldest requests keep moving, so a request is never starved by later arrivals.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from msc.engine.request import Request, Status
from msc.errors import MscError
from msc.runtime.paged_kv import PagedKVCache


@dataclass
class Scheduled:
    """One request's part of a step: `count` tokens from position `start`; sample: a token is drawn after it."""

    request: Request
    start: int
    count: int
    sample: bool


@dataclass
class StepRecord:
    """What one step did (kept by the engine for tests, traces and metrics)."""

    step: int
    decode: list[str] = field(default_factory=list)  # requests that fed one token (their last sample)
    prefill: list[tuple[str, int]] = field(default_factory=list)  # (request, prompt tokens fed)
    cached: list[tuple[str, int]] = field(default_factory=list)  # (request, prompt tokens found in the prefix cache)
    preempted: list[str] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (request, finish reason)
    tokens: int = 0
    seconds: float = 0.0  # from its start (or the previous step's tokens landing, if later) to its tokens landing


class Scheduler:
    """Picks each step's work from the waiting and running requests; see the module docstring."""

    def __init__(self, cache: PagedKVCache, *, max_batch: int, max_step_tokens: int):
        if max_batch < 1 or max_step_tokens < 1:
            raise MscError(f"scheduler: max_batch={max_batch}, max_step_tokens={max_step_tokens}; expected >= 1")
        self.cache, self.max_batch, self.max_step_tokens = cache, max_batch, max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ------------------------------------------------------------------ requests in and out
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out (finished, cancelled or failed) and free its pages at once (its full pages named
        first, with prefix caching: a later request that starts with its tokens finds them)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.name_pages(req)
        self.cache.drop_sequence(req.seq_id)

    def name_pages(self, req: Request) -> None:
        """Offer the request's full pages whose K/V a launched step writes and whose tokens are on the host."""
        known = len(req.prompt) + len(req.output)
        self.cache.name_pages(req.seq_id, min(req.computed, known), req.token_slice)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cache.page_size)

    # ------------------------------------------------------------------ one step
    def schedule(self, record: StepRecord) -> list[Scheduled]:
        budget = self.max_step_tokens
        out: list[Scheduled] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.sampled_all:  # its last token is on its way back (overlap): it finishes when it lands
                i += 1
                continue
            n = min(req.num_tokens - req.computed, budget)
            while not self._reserve(req, req.computed + n):
                victim = self.running[-1]
                self._preempt(victim, record)
                if victim is req:
                    break
            else:
                out.append(Scheduled(req, req.computed, n, req.computed + n == req.num_tokens))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: the requests after it were preempted before it
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            req = self.waiting[0]
            if req.pending:
                break  # preempted with a token still on the device: recomputed once it is on the host
            cached = self._admit(req, budget)
            if cached is None:
                break  # no pages now: it waits (running requests free theirs as they finish)
            self.waiting.popleft()
            n = min(req.num_tokens - cached, budget)
            req.status, req.computed = Status.RUNNING, cached
            self.running.append(req)
            out.append(Scheduled(req, cached, n, cached + n == req.num_tokens))
            if cached:
                record.cached.append((req.id, cached))
            budget -= n
        for s in out:  # a decode feeds back its one last sample; everything else is prompt (or recomputed) tokens
            if s.count == 1 and (s.request.output or s.request.pending) and s.start == s.request.num_tokens - 1:
                record.decode.append(s.request.id)
            else:
                record.prefill.append((s.request.id, s.count))
        record.tokens = sum(s.count for s in out)
        return out

    def _reserve(self, req: Request, tokens: int) -> bool:
        """Pages for `tokens` of a running req, if the pool has them (all or nothing)."""
        sid = req.seq_id
        have = len(self.cache.blocks(sid))
        if tokens <= have * self.cache.page_size:
            return True  # the common decode step: its page has room
        if self.pages_for(tokens) - have > self.cache.num_free:
            return False
        self.cache.ensure(sid, tokens)
        return True

    def _admit(self, req: Request, budget: int) -> int | None:
        """A waiting request's pages: its cached prefix attached, then pages for the tokens of its first chunk;
        the tokens found cached, or None (nothing held) when the pool cannot take it now."""
        sid = req.seq_id
        self.cache.add_sequence(sid)  # a waiting request holds no pages: preemption and a failed admission drop them
        cached = self.cache.attach_prefix(sid, req.num_tokens, req.token_slice)
        end = cached + min(req.num_tokens - cached, budget)
        if self.pages_for(end) - len(self.cache.blocks(sid)) > self.cache.num_free:
            self.cache.drop_sequence(sid, keep_names=True)
            return None
        self.cache.ensure(sid, end)
        if self.cache.prefix is not None:
            self.cache.prefix.count(req.num_tokens, cached)
        return cached

    def _preempt(self, req: Request, record: StepRecord) -> None:
        self.running.remove(req)
        self.name_pages(req)
        self.cache.drop_sequence(req.seq_id, keep_names=True)
        req.status, req.computed = Status.WAITING, 0
        req.preemptions += 1
        self.waiting.appendleft(req)
        record.preempted.append(req.id)
