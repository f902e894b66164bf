"""Serving: a bundle's role processes kept running, fed with requests as they come (continuous batching).

`ServingEngine` starts every role as a process (as `msc run` does), with the attention replicas in serve
mode: each connects back to this process (msc.runtime.serve_link) and runs its engine (msc.engine) on
the requests it is sent. A request goes at once to the replica with the fewest unfinished requests (or, with
several replicas and prefix caching, where its prefix went before: msc.runtime.prefix_router); the
replica takes it into its next step (no rounds: a request never waits for others to finish), streams
its tokens back step by step, and drops it at once when it is cancelled (`ServingRequest.cancel`, which
the HTTP layer calls when a client goes away).

A reader thread takes every replica's step events and hands them to the requests; a monitor thread
watches the processes: a role that dies fails every unfinished request with a message naming it, and the
engine reports itself broken (`health()`).
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import secrets
import select
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

from msc.bundle import Bundle, resolve_checkpoint
from msc.engine.build import prefix_caching_of
from msc.engine.engine import PAGE_SIZE
from msc.engine.request import SamplingParams
from msc.errors import MscError
from msc.runtime import lifecycle
from msc.runtime.launcher import failure_message, heartbeat_bound_s, spawn_roles, stop_roles
from msc.runtime.prefix_router import PrefixRouter
from msc.runtime.serve_link import Link, LinkServer
from msc.runtime.worker import resolve_run_config


@dataclass
class Completion:
    """What a finished request gets back."""

    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence or a stop token), "length" (max_tokens) or "cancelled"
    seconds: float  # from submission to the last token
    replica: int
    first_token_s: float | None  # from submission to the first token (None if none came)
    logprobs: list | None = None  # per token, when asked for (msc.engine.request.Request.logprobs)


class ServingRequest:
    """A submitted request: its result (a Completion), its tokens as they stream in, and cancellation."""

    def __init__(self, engine: "_Server", request_id: str, prompt: list[int], params: SamplingParams):
        self.engine, self.id, self.prompt, self.params = engine, request_id, prompt, params
        self.future: Future = Future()
        self.tokens: list[int] = []
        self.logprobs: list = []  # per token when params.logprobs is set (msc.engine.request.Request.logprobs)
        self.token_times: list[float] = []  # monotonic time each token arrived here
        self.submitted = time.monotonic()
        self.replica: int | None = None
        self._stream: queue.Queue = queue.Queue()  # (tokens, logprobs or None) per step; None at the end
        self._push_lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout=timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        """Stop generating for this request (its KV pages are freed); it finishes with reason "cancelled"."""
        self.engine.cancel(self.id)

    def stream(self, timeout: float | None = None) -> Iterator[list[int]]:
        """The new tokens of each step as they come, until the request finishes (MscError if it fails;
        `timeout` bounds each wait)."""
        while True:
            try:
                item = self._stream.get(timeout=timeout)
            except queue.Empty:
                raise MscError(f"request {self.id}: no tokens within {timeout} s") from None
            if item is None:
                self.future.result()  # raises the failure, if it failed
                return
            yield item[0]

    async def chunks(self, timeout: float | None = None) -> AsyncIterator[tuple[list[int], list | None]]:
        """For an asyncio caller (the HTTP layer): (new tokens, their logprobs or None) of each step, until
        the request finishes (MscError if it fails; `timeout` bounds each wait). One consumer per request."""
        q: asyncio.Queue = asyncio.Queue()
        with self._push_lock:  # what came before the consumer arrived goes first
            while True:
                try:
                    q.put_nowait(self._stream.get_nowait())
                except queue.Empty:
                    break
            self._async = (asyncio.get_running_loop(), q)
        while True:
            try:
                item = await asyncio.wait_for(q.get(), timeout)
            except asyncio.TimeoutError:
                raise MscError(f"request {self.id}: no tokens within {timeout} s") from None
            if item is None:
                self.future.result()
                return
            yield item

    # ---- called by the engine's reader thread
    def _push(self, item) -> None:
        with self._push_lock:
            if self._async is None:
                self._stream.put(item)
                return
            loop, q = self._async
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone (server shutting down)
            pass

    def _tokens(self, toks: list[int], logprobs: list | None = None) -> None:
        if toks:
            now = time.monotonic()
            self.tokens += toks
            self.token_times += [now] * len(toks)
            if logprobs:
                self.logprobs += logprobs
            self._push((list(toks), logprobs))

    def _finish(self, reason: str) -> None:
        now = time.monotonic()
        first = self.token_times[0] - self.submitted if self.token_times else None
        self.future.set_result(Completion(list(self.tokens), reason, now - self.submitted, self.replica, first,
                                          list(self.logprobs) if self.params.logprobs is not None else None))
        self._push(None)

    def _fail(self, error: str) -> None:
        if not self.future.done():
            self.future.set_exception(MscError(error))
            self._push(None)


class _Server:
    """What both servers share: the bundle's limits, the unfinished requests, validation, delivery of tokens
    and ends, breaking, and health. A subclass places a request (`_place`, under the lock) and sends it."""

    def __init__(self, bundle_dir: str | Path, request_timeout_s: float | None):
        self.bundle = Bundle.open(bundle_dir)
        m = self.bundle.manifest
        self.vocab = m["model"]["vocab_size"]
        eos = m["model"]["eos_token_id"]
        self.eos = {e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        self.batch_size = m["plan"]["batch_size"]
        self.timeout_s = m["spec"]["runtime"]["timeout_s"]
        # NOTE: the runtime's timeout_s bounds every single wait inside the roles; this bounds a whole request
        # for callers that wait on it (a long generation on a big model takes minutes)
        self.request_timeout_s = request_timeout_s or self.timeout_s * 4
        self._lock = threading.Lock()
        self._requests: dict[str, ServingRequest] = {}  # unfinished, by id
        self._ids = itertools.count()
        self._broken: str | None = None
        self._closing = False
        self.served = 0  # requests finished
        self.cancelled = 0
        self.checkpoint: str | None = None  # the checked checkpoint folder the roles read (None: random weights)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_request(self, prompt: list[int], max_new_tokens: int | None, params: SamplingParams | None) -> ServingRequest:
        """A checked, registered request (placed by `_place`); MscError for bad input or a server that cannot
        take it. Give either max_new_tokens (greedy) or SamplingParams."""
        if not prompt:
            raise MscError("the prompt needs at least one token id")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab]
        if bad:
            raise MscError(f"token id {bad[0]!r} is outside the model's vocabulary [0, {self.vocab})")
        if params is None:
            if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise MscError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
            params = SamplingParams(max_tokens=max_new_tokens)
        from msc.admission import Limits

        # NOTE: admission before anything is sent to a role or allocated (AdmissionError names the limit)
        Limits.of(self.bundle.manifest).check(len(prompt), params.max_tokens)
        req = ServingRequest(self, f"r{next(self._ids)}", list(prompt), params)
        with self._lock:
            if self._broken is not None:
                raise MscError(f"the server cannot take requests: {self._broken}")
            if self._closing:
                raise MscError("the server is shutting down")
            self._place(req)
            self._requests[req.id] = req
        return req

    def _place(self, req: ServingRequest) -> None:
        req.replica = 0

    def _finished(self, req: ServingRequest) -> None:
        """Bookkeeping once req has ended (called under the lock)."""

    def _deliver(self, rid: str, toks: list[int], reason: str | None, error: str | None,
                 logprobs: list | None = None) -> None:
        """A step's new tokens of request rid (and their logprobs), and its end when reason is set."""
        with self._lock:
            req = self._requests.get(rid)
            if req is not None and reason is not None:
                del self._requests[rid]
                self._finished(req)
        if req is None:
            return
        req._tokens(toks, logprobs)
        if reason == "error":
            req._fail(error or "the engine could not run the request")
        elif reason is not None:
            self.served += 1
            self.cancelled += reason == "cancelled"
            req._finish(reason)

    def _fail_unfinished(self, reason: str) -> None:
        with self._lock:
            left = list(self._requests.values())
            self._requests.clear()
        for req in left:
            req._fail(reason)

    def _break(self, reason: str) -> None:
        """Mark the server broken: every unfinished request fails with `reason`, no new ones are taken."""
        with self._lock:
            if self._broken is None:
                self._broken = reason
        self._fail_unfinished(self._broken)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Submit every prompt and wait for all of them (a convenience for scripts and tests)."""
        reqs = [self.submit(p, max_new_tokens) for p in prompts]
        return [r.result(timeout=self.request_timeout_s).token_ids for r in reqs]

    def _health(self, **extra) -> dict:
        with self._lock:
            running = len(self._requests)
        return {"status": "broken" if self._broken else "closing" if self._closing else "ok", "error": self._broken,
                "batch_size": self.batch_size, "unfinished": running, "served": self.served,
                "cancelled": self.cancelled, **extra}


class ServingEngine(_Server):
    """A bundle's roles as long-running processes serving generation requests; see the module docstring.

    Recovery: when a role dies or stays silent past runtime.heartbeat_timeout_s (stopped, hung), the
    unfinished requests fail with a message naming it and the cause, and the monitor thread restarts every
    role (`health()` says "restarting" meanwhile, then "ok" again). NOTE: all roles restart together because
    a replica's KV cache and the expert nodes' view of the replicas cannot be rebuilt piecemeal. At most
    `max_restarts` restarts within RESTART_WINDOW_S; past that the server stays broken (a role that dies
    at every start would otherwise restart forever)."""

    RESTART_WINDOW_S = 600.0

    def __init__(self, bundle_dir: str | Path, *, random_weights: bool = False, device: str | None = None,
                 microbatches: int | None = None, env: dict[str, str] | None = None,
                 request_timeout_s: float | None = None, max_restarts: int = 3, checkpoint: str | Path | None = None,
                 mps: dict[str, int] | None = None, record_routing: str | Path | None = None):
        super().__init__(bundle_dir, request_timeout_s)
        self.record_routing = record_routing  # write the replicas' routing profile here when the server closes
        m = self.bundle.manifest
        if mps is not None and (device or m["device"]) != "cuda":
            raise MscError("--mps shares a GPU between role processes: serve with --device cuda")
        self.mps, self._mps_daemon = mps, None  # {"attention": %, "expert": %}: the roles run under CUDA MPS
        self.replicas = [r for r in self.bundle.roles if r["kind"] == "attention"]
        self._run_config = {"microbatches": microbatches, "random_weights": random_weights, "device": device,
                            "checkpoint": None if checkpoint is None else str(checkpoint),
                            "record_routing": record_routing is not None}
        resolve_run_config(dict(self._run_config), m)  # bad options fail here, before any process starts
        if not random_weights:  # checked once here; every (re)start of the roles reads this folder
            self.checkpoint = self._run_config["checkpoint"] = resolve_checkpoint(self.bundle, checkpoint)
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise MscError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
        self.max_restarts = max_restarts
        self.heartbeat_s = heartbeat_bound_s(m)
        self._env = env
        self._load = [0] * len(self.replicas)  # unfinished requests per replica
        # NOTE: with several replicas and prefix caching, a request goes where its prefix went before (within a
        # load slack): each replica caches only what it computed (msc.runtime.prefix_router)
        self._router = None
        if prefix_caching_of(m, env) is not False and len(self.replicas) > 1:  # as the replicas will have it
            self._router = PrefixRouter(PAGE_SIZE)
        self._replica_stats: dict[int, dict] = {}  # each replica's engine stats, as of its last step
        self._stop = threading.Event()
        self._procs: list = []
        self._links: dict[int, Link] = {}
        self._send_locks: dict[int, threading.Lock] = {}
        self._reader: tuple[threading.Thread, threading.Event] | None = None
        self._monitor_thread: threading.Thread | None = None
        self._workdir: Path | None = None
        self._tag = ""
        self._server: LinkServer | None = None
        self._start_timeout_s: float | None = None
        self._restarting = False
        self.restart_times: list[float] = []  # monotonic time of each restart
        self.last_error: str | None = None  # why the roles last failed (kept after a restart)

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout_s: float | None = None) -> "ServingEngine":
        """Start the role processes and wait until every attention replica is ready (weights loaded,
        transport connected); MscError naming the role if one of them fails meanwhile."""
        if self._procs or self._monitor_thread is not None:
            raise MscError("this server was started already")
        self._start_timeout_s = timeout_s or self.timeout_s * 4
        self._launch()
        self._monitor_thread = threading.Thread(target=self._monitor, name="msc-monitor", daemon=True)
        self._monitor_thread.start()
        return self

    def _launch(self) -> None:
        """Start every role, connect the replicas' links and start their reader (all torn down on failure)."""
        timeout_s = self._start_timeout_s
        self._workdir = Path(tempfile.mkdtemp(prefix="msc-serve-"))
        self._tag = lifecycle.new_run_tag()
        token = secrets.token_hex(16)
        self._server = LinkServer(token, host=self.link_host)
        cfg = {**self._run_config, "serve": {"host": self._server.host, "port": self._server.port, "token": token}}
        try:
            self._start_roles(cfg)
            links = self._server.accept(len(self.replicas), timeout_s, check=self._raise_if_a_role_failed)
            for r, link in sorted(links.items()):
                msg = link.wait(timeout_s, on_idle=self._raise_if_a_role_failed, idle_every_s=0.2)
                if not msg.get("ready"):
                    raise MscError(f"attention replica {r} did not report ready: {msg}")
                if "stats" in msg:
                    self._replica_stats[r] = msg["stats"]
            self._links = links
            self._send_locks = {r: threading.Lock() for r in links}
        except BaseException:
            self._shutdown_processes(grace_s=0)
            raise
        stop = threading.Event()
        reader = threading.Thread(target=self._read_loop, args=(dict(links), stop), name="msc-reader", daemon=True)
        self._reader = (reader, stop)
        reader.start()

    link_host = "127.0.0.1"  # where the replicas reach this server (msc launch --serve: the rendezvous host)

    def _start_roles(self, cfg: dict) -> None:
        """Start every role process on this machine with run config `cfg` (msc launch overrides this)."""
        mps = None
        if self.mps is not None:
            from msc.runtime.mps import MpsDaemon

            self._mps_daemon = MpsDaemon(self._workdir).start()
            mps = (self._mps_daemon, self.mps)
        self._procs = spawn_roles(self.bundle, self._workdir, cfg, self._env, tag=self._tag, mps=mps)

    def _write_routing(self) -> None:
        """The replicas' routing counts (each wrote its own when told to stop) summed into one profile."""
        import json

        from msc.runtime.routing_recorder import write_profile

        total: dict[int, list[int]] = {}
        for r in self.replicas:
            f = self._workdir / f"result.{r['rank']}.json"
            if not f.exists():
                continue  # a replica that did not stop cleanly has no counts to give
            for layer, c in (json.loads(f.read_text()).get("routing") or {}).items():
                layer = int(layer)
                total[layer] = [a + b for a, b in zip(total[layer], c)] if layer in total else list(c)
        write_profile(total, self.bundle.manifest["model"]["num_experts"], self.record_routing)

    def _stop_roles(self, grace_s: float) -> None:
        stop_roles(self._procs, grace_s)
        if self._mps_daemon is not None:
            self._mps_daemon.stop()
            self._mps_daemon = None

    def close(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, fail the unfinished ones, tell the replicas to stop and wait for every role
        process to end (killing what is left after grace_s)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._fail_unfinished("the server is shutting down")
        for r in list(self._links):
            self._send(r, {"stop": True}, quiet=True)
        self._stop.set()
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=max(grace_s, 5.0) + 5.0)  # it may be in the middle of a restart
        self._shutdown_processes(grace_s)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], max_new_tokens: int | None = None, params: SamplingParams | None = None) -> ServingRequest:
        """Send one request to a replica (`_place`); its `result()` is a Completion (MscError if it fails).
        Give either max_new_tokens (greedy) or SamplingParams."""
        req = self._new_request(prompt, max_new_tokens, params)
        p = {k: v for k, v in req.params.__dict__.items() if v is not None}
        p["stop_token_ids"] = list(req.params.stop_token_ids)
        self._send(req.replica, {"add": {"id": req.id, "prompt": req.prompt, "params": p}})
        return req

    def _place(self, req: ServingRequest) -> None:
        if self._router is not None:
            r = self._router.place(req.prompt, self._load)
        else:
            r = min(range(len(self._load)), key=lambda i: (self._load[i], i))
        req.replica = r
        self._load[r] += 1

    def _finished(self, req: ServingRequest) -> None:
        self._load[req.replica] -= 1

    def cancel(self, request_id: str) -> None:
        with self._lock:
            req = self._requests.get(request_id)
        if req is not None:
            self._send(req.replica, {"cancel": request_id}, quiet=True)

    def stats(self) -> dict:
        """The replicas' engines together (as of their last steps): running, waiting, kv_pages_used/total, and
        with prefix caching the tokens looked up and found and the cached pages nobody holds."""
        keys = ("running", "waiting", "kv_pages_used", "kv_pages_total", "kv_pages_cached",
                "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
        stats = list(self._replica_stats.values())
        return {k: sum(st.get(k, 0) for st in stats) for k in keys}

    def health(self) -> dict:
        with self._lock:
            load = list(self._load)
            restarting = self._restarting
        h = self._health(replicas=len(self.replicas), roles=[r["name"] for r in self.bundle.roles], per_replica=load,
                         restarts=len(self.restart_times), last_error=self.last_error)
        if restarting and not self._closing:
            h["status"] = "restarting"
        return h

    # ------------------------------------------------------------------ threads
    def _send(self, r: int, msg: dict, quiet: bool = False) -> None:
        try:
            with self._send_locks[r]:
                self._links[r].send(msg)
        except (MscError, KeyError) as e:
            if not quiet:
                self._break(self._role_failure(within_s=2.0) or str(e))
                raise MscError(f"the server cannot take requests: {self._broken}") from None

    def _read_loop(self, links: dict[int, Link], stop: threading.Event) -> None:
        by_sock = {link.sock: r for r, link in links.items()}
        try:
            while not stop.is_set():
                ready, _, _ = select.select(list(by_sock), [], [], 0.2)
                for sock in ready:
                    r = by_sock[sock]
                    msg = links[r].recv(0.0)
                    if msg is not None:
                        self._events(r, msg)
        except (MscError, OSError, ValueError) as e:
            if not self._closing and not stop.is_set():
                # NOTE: a replica's link breaks when some role died; the process's exit names the culprit
                # better than the broken link does, so wait (briefly, bounded) for an exit status first.
                self._break(self._role_failure(within_s=2.0) or str(e))

    def _events(self, r: int, msg: dict) -> None:
        if "stats" in msg:
            self._replica_stats[r] = msg["stats"]
        for rid, toks, reason, error, logprobs in msg.get("events", []):
            self._deliver(rid, toks, reason, error, logprobs)

    def _monitor(self) -> None:
        """Watch the roles (exits, heartbeats); on a failure, fail the unfinished requests and restart."""
        while not self._stop.is_set():
            if self._broken is None:
                try:
                    self._raise_if_a_role_failed()
                except MscError as e:
                    self._break(str(e))
            if self._broken is not None and not self._closing:
                self.last_error = self._broken
                if not self._may_restart():
                    return
                self._restart()
            self._stop.wait(0.1)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        recent = [t for t in self.restart_times if now - t < self.RESTART_WINDOW_S]
        return len(recent) < self.max_restarts

    def _restart(self) -> None:
        """Replace every role process; the server takes requests again once they are ready."""
        with self._lock:
            self._restarting = True
        self.restart_times.append(time.monotonic())
        self._shutdown_processes(grace_s=0)
        if self._stop.is_set():
            return
        try:
            self._launch()
        except MscError as e:
            self.last_error = self._broken = f"restarting the roles failed: {e}"
            with self._lock:
                self._restarting = False
            return
        with self._lock:
            self._load = [0] * len(self.replicas)
            self._replica_stats.clear()
            self._broken = None
            self._restarting = False

    def _raise_if_a_role_failed(self) -> None:
        if self._closing or not self._procs or self._workdir is None:
            return
        msg = failure_message(self._procs, self._workdir)
        if msg is None:
            running = [r for r, p in self._procs if p.poll() is None]
            msg = lifecycle.silence_message(self._workdir, running, self.heartbeat_s)
        if msg is not None:
            raise MscError(msg)

    def _role_failure(self, within_s: float) -> str | None:
        """The message of a role that failed, waiting up to within_s for one; None if none did."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                self._raise_if_a_role_failed()
            except MscError as e:
                return str(e)
            if time.monotonic() >= deadline or self._closing:
                return None
            self._stop.wait(0.05)

    def _shutdown_processes(self, grace_s: float) -> None:
        if self._reader is not None:
            thread, stop = self._reader
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=5)
            self._reader = None
        self._stop_roles(grace_s)
        if self.record_routing is not None and self._workdir is not None:
            self._write_routing()
        for link in self._links.values():
            link.close()
        self._links, self._send_locks = {}, {}
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._workdir is not None:
            lifecycle.cleanup_run(self._workdir, self._tag)
            self._workdir = None


class ColocatedServingEngine(_Server):
    """`msc serve --colocated`: the bundle's colocated program on the engine in this process, stepped by a
    thread; the same interface as ServingEngine (submit, cancel, generate, health, close) and the same
    engine as every other path, with the experts in process instead of on expert nodes."""

    def __init__(self, bundle_dir: str | Path, *, random_weights: bool = False, device: str | None = None,
                 request_timeout_s: float | None = None, checkpoint: str | Path | None = None,
                 record_routing: str | Path | None = None):
        import torch

        from msc.engine.build import build_engine

        super().__init__(bundle_dir, request_timeout_s)
        m = self.bundle.manifest
        if "colocated" not in m:
            raise MscError(f"bundle {bundle_dir} has no colocated program (compiled by an older msc); compile it again")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolve_run_config({"random_weights": random_weights, "device": self.device,
                            "checkpoint": None if checkpoint is None else str(checkpoint)}, m)
        if not random_weights:
            self.checkpoint = resolve_checkpoint(self.bundle, checkpoint)
        program = self.bundle.load_program(m["colocated"]["program"], self.device, random_weights=random_weights,
                                           checkpoint=self.checkpoint)
        # NOTE: no CUDA graphs while recording the routing: a graph's padding rows would be counted; no overlapped
        # steps either: the void token a stopping request computes would be
        rec = record_routing is not None
        self.engine = build_engine(m, program, self.device, cuda_graphs=not rec, overlap=False if rec else None)
        self.record_routing, self._recorder = record_routing, None
        if record_routing is not None:  # after build_engine: its KV-shape probe runs the program on a dummy token
            from msc.runtime import routing_recorder

            self._recorder = routing_recorder.record(m["model"]["num_experts"])
        self.replicas = [{"name": "colocated"}]
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float | None = None) -> "ColocatedServingEngine":
        if self._thread is not None:
            raise MscError("this server was started already")
        self._thread = threading.Thread(target=self._loop, name="msc-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, grace_s: float = 30.0) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._fail_unfinished("the server is shutting down")
        self.engine.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s)
        if self._recorder is not None:
            from msc.runtime import routing_recorder

            routing_recorder.stop()
            self._recorder.write(self.record_routing)

    def submit(self, prompt: list[int], max_new_tokens: int | None = None,
               params: SamplingParams | None = None) -> ServingRequest:
        req = self._new_request(prompt, max_new_tokens, params)
        self.engine.submit(req.id, req.prompt, req.params, self._on_token)
        return req

    def _on_token(self, r, toks: list[int]) -> None:
        """Called on the engine thread with a step's new tokens of request r (and at its end)."""
        if r.finished:
            self.engine.forget(r.id)
        lps = r.logprobs[len(r.logprobs) - len(toks):] if r.params.logprobs is not None and toks else None
        self._deliver(r.id, toks, r.finish_reason if r.finished else None, r.error, lps)

    def stats(self) -> dict:
        return self.engine.stats()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel_threadsafe(request_id)

    def health(self) -> dict:
        return self._health(replicas=1, roles=["colocated"], device=self.device,
                            per_replica=[len(self._requests)])

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._closing:
                if not eng.has_work:
                    eng.wakeup.wait(0.5)  # woken by submit / cancel; the bound only rechecks _closing
                    continue
                eng.step()
        except Exception as e:  # noqa: BLE001 (any failure of a step ends the server with its reason)
            self._break(f"the engine failed: {type(e).__name__}: {e}")
