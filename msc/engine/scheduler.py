"""The scheduler: which requests run in the next step, and how many of their tokens.

Every step (continuous batching, as vLLM's and SGLang's schedulers do):
1. running requests first, in the order they were admitted: a decoding request feeds its last token; a
   request still in its prompt feeds the next chunk that fits the step's token budget. Each gets the KV
   pages its new tokens need, on demand; when the pool is out of pages, the youngest running request is
   preempted (its pages freed; it is recomputed later from its prompt and the tokens it already made);
2. then waiting requests (preempted ones first, then by arrival) are admitted while the token budget,
   the batch limit and the free pages allow; a prompt longer than the budget goes in chunks over steps.
A finished or cancelled request's pages are freed at once.

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
        """Take a request out (finished, cancelled or failed) and free its pages at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.cache.drop_sequence(req.seq_id)

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
            n = min(req.num_tokens, budget)
            if not self._reserve(req, n, fresh=True):
                break  # no pages now: it waits (running requests free theirs as they finish)
            self.waiting.popleft()
            req.status, req.computed = Status.RUNNING, 0
            self.running.append(req)
            out.append(Scheduled(req, 0, n, n == req.num_tokens))
            budget -= n
        for s in out:  # a decode feeds back its one last sample; everything else is prompt (or recomputed) tokens
            if s.count == 1 and (s.request.output or s.request.pending) and s.start == s.request.num_tokens - 1:
                record.decode.append(s.request.id)
            else:
                record.prefill.append((s.request.id, s.count))
        record.tokens = sum(s.count for s in out)
        return out

    def _reserve(self, req: Request, tokens: int, fresh: bool = False) -> bool:
        """Pages for `tokens` of req, if the pool has them (all or nothing)."""
        sid = req.seq_id
        if not fresh and tokens <= len(self.cache.blocks(sid)) * self.cache.page_size:
            return True  # the common decode step: its page has room
        if fresh:
            self.cache.drop_sequence(sid)
            self.cache.add_sequence(sid)
        have = len(self.cache.blocks(sid))
        if self.pages_for(tokens) - have > self.cache.allocator.num_free:
            if fresh:
                self.cache.drop_sequence(sid)
            return False
        self.cache.ensure(sid, tokens)
        return True

    def _preempt(self, req: Request, record: StepRecord) -> None:
        self.running.remove(req)
        self.cache.drop_sequence(req.seq_id)
        req.status, req.computed = Status.WAITING, 0
        req.preemptions += 1
        self.waiting.appendleft(req)
        record.preempted.append(req.id)
