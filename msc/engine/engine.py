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

from msc import env as msc_env
from msc.engine.request import Request, SamplingParams, Status, seed_from
from msc.engine.runner import ModelRunner, StepInput
from msc.engine.sampler import SamplingBatch, sample, token_logprobs
from msc.engine.scheduler import Scheduled, Scheduler, StepRecord
from msc.errors import MscError
from msc.runtime.transfer import HostCopy, tensor_to_device

PAGE_SIZE = 16  # tokens per KV page


def default_overlap(runner: ModelRunner, keep_logits: bool = False) -> bool:
    """Whether an engine overlaps its steps by default: on a GPU, for a program that runs in this process.

    NOTE: with overlap the host schedules and queues step n+1 while the device still runs step n (step n+1
    takes the tokens step n sampled straight from the device), then reads step n's tokens back; the host's
    share of a step (scheduling, metadata, bookkeeping) hides behind the device's work. The tokens are the same
    ones; a request that stops at step n has one void token computed at n+1. An attention role's steps hand
    tokens to the experts through the host, and keep_logits (verify) reads every step's logits, so those do not
    overlap; on a CPU there is nothing to hide the host work behind. MSC_OVERLAP=0 / 1 turns it off / on."""
    wanted = msc_env.switch("MSC_OVERLAP")
    if wanted is None:
        wanted = runner.device.type == "cuda"
    return wanted and not getattr(runner, "remote", False) and not keep_logits


class Engine:
    """Scheduler + model runner + sampler; see the module docstring.

    max_batch: the most requests running at once (the plan's batch_size). max_step_tokens: the token
    budget of one step (prompt chunks and decodes together). kv_tokens: the KV pool's size in tokens
    (default: max_batch sequences of max_seq_len). keep_logits: keep each sampled token's logits on the
    request (verification). prefix_caching: attach cached full KV pages to requests that start with the same
    tokens (msc.runtime.prefix_cache; default MSC_PREFIX_CACHE, else on unless the model has state layers)."""

    def __init__(self, runner: ModelRunner, eos_token_ids: Iterable[int | None] = (), *, max_batch: int = 32,
                 max_step_tokens: int = 8192, max_seq_len: int = 4096, kv_tokens: int | None = None,
                 page_size: int = PAGE_SIZE, keep_logits: bool = False, vocab_size: int | None = None,
                 overlap: bool | None = None, prefix_caching: bool | None = None):
        self.runner = runner
        self.eos = {int(e) for e in eos_token_ids if e is not None}
        self.max_seq_len, self.page_size = max_seq_len, page_size
        self.vocab_size = vocab_size
        kv_tokens = kv_tokens or max_batch * max_seq_len
        self.num_pages = -(-kv_tokens // page_size)
        cache = runner.make_cache(self.num_pages + 1, page_size, max_seq_len)  # + the scratch page
        self.scheduler = Scheduler(cache, max_batch=max_batch, max_step_tokens=max_step_tokens)
        if prefix_caching is None:
            prefix_caching = msc_env.switch("MSC_PREFIX_CACHE")
        if prefix_caching is None:
            prefix_caching = cache.states is None  # NOTE: a state layer's recurrent state is not held in pages
        if prefix_caching:
            cache.enable_prefix_cache()  # refuses a model with state layers by name
        self.keep_logits = keep_logits
        if overlap and getattr(runner, "remote", False):
            raise MscError("an attention role's steps hand their tokens to the experts through the host: its engine "
                           "cannot overlap steps (overlap=True)")
        self.overlap = default_overlap(runner, keep_logits) if overlap is None else overlap
        self._in_flight: _Launched | None = None  # overlap: the step launched last, its tokens not yet read
        self._last_done = 0.0  # perf_counter() when the last step's tokens were read back
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
        return self.scheduler.has_work or bool(self._inbox) or self._in_flight is not None

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def stats(self) -> dict:
        """Running and waiting requests and KV pages in use (the scratch page of CUDA graphs not counted)."""
        cache = self.scheduler.cache
        out = {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
               "kv_pages_used": cache.blocks_in_use, "kv_pages_total": self.num_pages}
        if cache.prefix is not None:
            out.update(prefix_cache_queried_tokens=cache.prefix.queried_tokens,
                       prefix_cache_hit_tokens=cache.prefix.hit_tokens, kv_pages_cached=len(cache.prefix))
        return out

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
        """Schedule and launch one step; returns its record. Without overlap the step's tokens are read back and
        streamed before it returns; with overlap they are read back during the next step (its record's
        `finished` fills in then) and the step returns as soon as the previous step's tokens are handled."""
        self._drain_inbox()
        t0 = time.perf_counter()
        record = StepRecord(self.step_no)
        work = self.scheduler.schedule(record)
        launched = self._launch(work, record, t0) if work else None
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._complete(previous)
        if launched is not None:
            if self.overlap:
                self._in_flight = launched
            else:
                self._complete(launched)
        else:
            record.seconds = time.perf_counter() - t0
        self.records.append(record)
        self.step_no += 1
        return record

    def _launch(self, work: list[Scheduled], record: StepRecord, t0: float) -> "_Launched":
        """Queue the step's program and its sampling on the device (no host sync on the GPU path)."""
        tokens, dst, rows, t = [], [], [], 0
        for s in work:
            req = s.request
            if req.pending:  # its last token was sampled by the step still in flight: it is taken on the device
                if s.count != 1 or s.start != req.num_tokens - 1:
                    raise MscError(f"engine: request {req.id} has a token on the device but was scheduled "
                                   f"{s.count} tokens from {s.start}; expected its one pending token")
                dst.append(t)
                rows.append(req.pending_row)
                tokens.append(0)
            else:
                tokens += req.token_slice(s.start, s.count)
            t += s.count
        step = StepInput([s.request.seq_id for s in work], [s.start for s in work], [s.count for s in work], tokens,
                         [i for i, s in enumerate(work) if s.sample], dst, rows,
                         self._in_flight.tokens if dst else None)
        logits = self.runner.execute(step)  # [S, V]
        naming = self.scheduler.cache.prefix is not None
        for s in work:
            s.request.computed = s.start + s.count
            if naming:  # its pages' K/V are written (queued) now: full ones can be found by later requests
                self.scheduler.name_pages(s.request)
        sampled = [work[i] for i in step.sample_rows]
        out = _Launched(record, sampled, t0)
        if sampled:
            batch = SamplingBatch.build([s.request.params for s in sampled],
                                        [s.request.num_tokens for s in sampled], logits.device)
            out.tokens = sample(logits, batch)  # [B]
            back = [out.tokens]
            out.logprob_rows = [j for j, s in enumerate(sampled) if s.request.params.logprobs is not None]
            if out.logprob_rows:
                idx = tensor_to_device(out.logprob_rows, torch.long, logits.device)
                k = max(sampled[j].request.params.logprobs for j in out.logprob_rows)
                back += token_logprobs(logits.index_select(0, idx), out.tokens.index_select(0, idx), k)
            out.host = HostCopy(back)
            if self.keep_logits:
                out.logits = [row.float().cpu() for row in logits]
            for j, s in enumerate(sampled):
                s.request.pending += 1
                s.request.pending_row = j
        return out

    def _complete(self, done: "_Launched") -> None:
        """Read a launched step's tokens back (the step's one host sync) and stream them to their requests."""
        record = done.record
        if done.host is not None:
            got = done.host.wait()
            new = got[0].tolist()
            lps = [x.tolist() for x in got[1:]] if done.logprob_rows else None
            keep = {j: n for n, j in enumerate(done.logprob_rows)}
            for j, (s, tok) in enumerate(zip(done.sampled, new)):
                req = s.request
                req.pending -= 1
                if req.finished:  # stopped by the step before or cancelled while this one ran: its token is void
                    continue
                req.output.append(tok)
                if done.logits is not None:
                    req.logits.append(done.logits[j])
                if j in keep:
                    n, kk = keep[j], req.params.logprobs
                    req.logprobs.append([lps[0][n], [[i, v] for i, v in zip(lps[2][n][:kk], lps[1][n][:kk])]])
                reason = self._stop_reason(req, tok)
                if reason is None:
                    if req.on_token is not None:
                        req.on_token(req, [tok])
                else:
                    self._finish(req, reason, None, [tok], record)
        # NOTE: a step's seconds run from its start, or from the previous step's tokens landing if that came later
        # (with overlap a step starts while the one before still runs): in steady state the time between two
        # steps' tokens, so medians over decode steps mean the same with and without overlap
        now = time.perf_counter()
        record.seconds = now - max(done.t0, self._last_done)
        self._last_done = now

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
        while k < len(order) or self.scheduler.has_work or self._in_flight is not None:
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


class _Launched:
    """A step queued on the device whose tokens have not been read back yet."""

    def __init__(self, record: StepRecord, sampled: list[Scheduled], t0: float):
        self.record, self.sampled, self.t0 = record, sampled, t0
        self.tokens: torch.Tensor | None = None  # [B] the sampled tokens, on the device
        self.host: HostCopy | None = None  # the tokens (and log-probabilities) on their way to the host
        self.logprob_rows: list[int] = []
        self.logits: list | None = None  # keep_logits: each sampled row's logits (float32, host)
