"""The engine: one attention replica's loop of steps (or a whole colocated model's).

    engine = Engine(runner, eos_token_ids, max_batch=64)
    engine.add_request("a", [5, 17, 42], SamplingParams(max_tokens=8))
    while engine.has_work:
        engine.step()          # schedule -> run the program -> sample on the device -> stream tokens

Requests can be added and cancelled between steps, from the same thread (a role process's loop reads
them from its link) or from other threads through `submit` / `cancel_threadsafe`, which queue them for
the next step. Every request's new tokens go to its `on_token` callback as they are made, and the
engine keeps a `StepRecord` of every step (who ran, who finished, who was preempted).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterable

import torch

from msc.engine.request import Request, SamplingParams, Status, seed_from
from msc.engine.runner import ModelRunner, StepInput
from msc.engine.sampler import SamplingBatch, sample, token_logprobs
from msc.engine.scheduler import Scheduler, StepRecord
from msc.errors import MscError

PAGE_SIZE = 16  # tokens per KV page


class Engine:
    """Scheduler + model runner + sampler; see the module docstring.

    max_batch: the most requests running at once (the plan's batch_size). max_step_tokens: the token
    budget of one step (prompt chunks and decodes together). kv_tokens: the KV pool's size in tokens
    (default: max_batch sequences of max_seq_len). keep_logits: keep each sampled token's logits on the
    request (verification)."""

    def __init__(self, runner: ModelRunner, eos_token_ids: Iterable[int | None] = (), *, max_batch: int = 32,
                 max_step_tokens: int = 8192, max_seq_len: int = 4096, kv_tokens: int | None = None,
                 page_size: int = PAGE_SIZE, keep_logits: bool = False, vocab_size: int | None = None):
        self.runner = runner
        self.eos = {int(e) for e in eos_token_ids if e is not None}
        self.max_seq_len, self.page_size = max_seq_len, page_size
        self.vocab_size = vocab_size
        kv_tokens = kv_tokens or max_batch * max_seq_len
        self.num_pages = -(-kv_tokens // page_size)
        cache = runner.make_cache(self.num_pages + 1, page_size, max_seq_len)  # + the scratch page
        self.scheduler = Scheduler(cache, max_batch=max_batch, max_step_tokens=max_step_tokens)
        self.keep_logits = keep_logits
        self.requests: dict[str, Request] = {}
        self.records: deque[StepRecord] = deque(maxlen=100_000)
        self.step_no = 0
        self._next_seq = 0
        self._inbox: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self.wakeup = threading.Event()  # set when something arrives in the inbox

    # ------------------------------------------------------------------ requests (engine thread)
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams | None = None,
                    on_token: Callable[[Request, list[int]], None] | None = None) -> Request:
        """Queue a request; MscError (for this request only) when it can never run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise MscError(f"request id {request_id!r} is already in the engine")
        if not prompt:
            raise MscError("the prompt needs at least one token id")
        if self.vocab_size is not None:
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise MscError(f"token id {bad[0]!r} is outside the model's vocabulary [0, {self.vocab_size})")
        need = len(prompt) + params.max_tokens
        if need > self.max_seq_len:
            raise MscError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) is {need} tokens; "
                           f"this engine holds sequences of at most {self.max_seq_len}")
        if self.scheduler.pages_for(need) > self.num_pages:
            raise MscError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) needs "
                           f"{self.scheduler.pages_for(need)} KV pages; the whole pool has {self.num_pages} "
                           f"({self.num_pages * self.page_size} tokens)")
        if params.seed is None and not params.greedy:
            params = SamplingParams(**{**params.__dict__, "seed": seed_from(request_id)})
        req = Request(request_id, list(prompt), params, on_token=on_token, seq_id=self._next_seq)
        self._next_seq += 1
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def cancel(self, request_id: str) -> bool:
        """Stop a request now (its pages freed); False when it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "cancelled", None)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._inbox)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> dict:
        """Running and waiting requests and KV pages in use (the scratch page of CUDA graphs not counted)."""
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_pages_used": self.scheduler.cache.blocks_in_use, "kv_pages_total": self.num_pages}

    # ------------------------------------------------------------------ requests (other threads)
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               on_token: Callable[[Request, list[int]], None]) -> None:
        """Thread-safe add: taken in before the next step (a request that can never run is finished with
        reason "error" through on_token)."""
        with self._lock:
            self._inbox.append(("add", (request_id, prompt, params, on_token)))
        self.wakeup.set()

    def cancel_threadsafe(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("cancel", request_id))
        self.wakeup.set()

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self.wakeup.clear()
        for kind, arg in items:
            if kind == "cancel":
                self.cancel(arg)
                continue
            rid, prompt, params, on_token = arg
            try:
                self.add_request(rid, prompt, params, on_token)
            except MscError as e:
                req = Request(rid, list(prompt) or [0], params, on_token=on_token, status=Status.FINISHED,
                              finish_reason="error", error=str(e))
                on_token(req, [])

    # ------------------------------------------------------------------ a step
    def step(self) -> StepRecord:
        """Schedule, run and sample one step; returns its record."""
        self._drain_inbox()
        t0 = time.perf_counter()
        record = StepRecord(self.step_no)
        work = self.scheduler.schedule(record)
        if work:
            step = StepInput([s.request.seq_id for s in work], [s.start for s in work], [s.count for s in work],
                             [t for s in work for t in s.request.token_slice(s.start, s.count)],
                             [i for i, s in enumerate(work) if s.sample])
            logits = self.runner.execute(step)  # [S, V]
            sampled = [work[i] for i in step.sample_rows]
            new = []
            if sampled:
                batch = SamplingBatch.build([s.request.params for s in sampled],
                                            [s.request.num_tokens for s in sampled], logits.device)
                new_t = sample(logits, batch)  # [B]
                self._logprobs(sampled, logits, new_t)
                new = new_t.tolist()  # the step's one host sync (two with logprobs)
            for s in work:
                s.request.computed = s.start + s.count
            for s, tok, row in zip(sampled, new, logits if self.keep_logits else [None] * len(new)):
                req = s.request
                req.output.append(tok)
                if row is not None:
                    req.logits.append(row.float().cpu())
                reason = self._stop_reason(req, tok)
                if reason is None:
                    if req.on_token is not None:
                        req.on_token(req, [tok])
                else:
                    self._finish(req, reason, None, [tok], record)
        record.seconds = time.perf_counter() - t0
        self.records.append(record)
        self.step_no += 1
        return record

    @staticmethod
    def _logprobs(sampled, logits, tokens) -> None:
        """Append the sampled tokens' log-probabilities to the requests that asked for them."""
        rows = [j for j, s in enumerate(sampled) if s.request.params.logprobs is not None]
        if not rows:
            return
        idx = torch.tensor(rows, device=logits.device)
        k = max(sampled[j].request.params.logprobs for j in rows)
        chosen, top_vals, top_ids = token_logprobs(logits.index_select(0, idx), tokens.index_select(0, idx), k)
        chosen, top_vals, top_ids = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        for n, j in enumerate(rows):
            kk = sampled[j].request.params.logprobs
            sampled[j].request.logprobs.append([chosen[n], [[t, v] for t, v in zip(top_ids[n][:kk], top_vals[n][:kk])]])

    def _stop_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if len(req.output) >= p.max_tokens:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, error: str | None, last: list[int] | None = None,
                record: StepRecord | None = None) -> None:
        self.scheduler.remove(req)
        req.status, req.finish_reason, req.error = Status.FINISHED, reason, error
        if record is not None:
            record.finished.append((req.id, reason))
        if req.on_token is not None:
            req.on_token(req, last or [])

    def forget(self, request_id: str) -> None:
        """Drop a finished request's bookkeeping (long-running servers call this once it was answered)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]

    # ------------------------------------------------------------------ a batch, to the end
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 arrivals: list[int] | None = None, *, ids: list[str] | None = None,
                 on_step: Callable[[StepRecord], None] | None = None) -> list[Request]:
        """Run `prompts` to completion (request i added at step arrivals[i] after the first, default 0); the
        finished requests in prompt order. A prompt that can never run fails alone (finish reason "error").
        on_step is called after every step (role processes send heartbeats there)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        arrivals = arrivals or [0] * len(prompts)
        if len(plist) != len(prompts) or len(arrivals) != len(prompts):
            raise MscError(f"{len(prompts)} prompts with {len(plist)} sampling parameters and {len(arrivals)} arrivals")
        order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        base = self.step_no
        ids = ids or [f"gen-{base}-{i}" for i in range(len(prompts))]
        reqs: dict[int, Request] = {}
        k = 0
        while k < len(order) or self.scheduler.has_work:
            while k < len(order) and arrivals[order[k]] <= self.step_no - base:
                i = order[k]
                try:
                    reqs[i] = self.add_request(ids[i], prompts[i], plist[i])
                except MscError as e:
                    reqs[i] = Request(ids[i], list(prompts[i]), plist[i], status=Status.FINISHED,
                                      finish_reason="error", error=str(e))
                k += 1
            record = self.step()
            if on_step is not None:
                on_step(record)
        return [reqs[i] for i in range(len(prompts))]
