"""Serving: a bundle's role processes kept running, fed with requests as they come.

`ServingEngine` starts every role as a process (as `msc run` does), with the attention replicas in serve
mode: each connects back to this process (msc.runtime.wave_channel) and generates the waves it is sent.
Requests (one prompt each, with its own max_new_tokens) queue here. A scheduler thread works in rounds:
it takes up to batch_size requests per replica, gives each replica its share as a wave, and waits for
all of them, so concurrent requests are decoded together and the replicas work side by side. A monitor
thread watches the processes: a role that dies fails every queued and running request with a message
naming it, and the engine reports itself broken.

NOTE: batching is static, per round: a request that arrives during a round waits for the next one, and a
replica whose wave ends early waits for the round's others (msc.runtime.exchange says why replicas join
the expert nodes only together). Adding requests to running waves (continuous batching) needs the KV
cache to take sequences mid-wave and the expert nodes to regroup replicas mid-round; not built.
"""
from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from msc.bundle import Bundle
from msc.errors import MscError
from msc.runtime.launcher import role_log_tail, spawn_roles, stop_roles
from msc.runtime.wave_channel import Link, WaveServer
from msc.runtime.worker import resolve_run_config


@dataclass
class Completion:
    """What a request gets back."""

    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens reached)
    seconds: float  # from submission to the answer
    replica: int


@dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


class ServingEngine:
    """A bundle's roles as long-running processes serving generation requests; see the module docstring."""

    def __init__(self, bundle_dir: str | Path, *, random_weights: bool = False, device: str | None = None,
                 microbatches: int | None = None, batch_window_s: float = 0.005, env: dict[str, str] | None = None,
                 wave_timeout_s: float | None = None):
        self.bundle = Bundle.open(bundle_dir)
        m = self.bundle.manifest
        self.vocab = m["model"]["vocab_size"]
        eos = m["model"]["eos_token_id"]
        self.eos = {e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        self.batch_size = m["plan"]["batch_size"]
        self.timeout_s = m["spec"]["runtime"]["timeout_s"]
        # NOTE: a wave's bound scales with what it holds: a full batch of long generations on a big model takes
        # minutes; the runtime's timeout_s bounds every single wait inside the roles, this the whole wave.
        self.wave_timeout_s = wave_timeout_s or self.timeout_s * 4
        self.batch_window_s = batch_window_s
        self.replicas = [r for r in self.bundle.roles if r["kind"] == "attention"]
        self._run_config = {"microbatches": microbatches, "random_weights": random_weights, "device": device}
        resolve_run_config(dict(self._run_config), m)  # bad options fail here, before any process starts
        self._env = env
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._broken: str | None = None
        self._closing = False
        self._procs: list = []
        self._links: dict[int, Link] = {}
        self._threads: list[threading.Thread] = []
        self._workdir: Path | None = None
        self._server: WaveServer | None = None
        self.waves = 0  # waves answered (one per member replica and round)
        self.served = 0  # requests answered

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout_s: float | None = None) -> "ServingEngine":
        """Start the role processes and wait until every attention replica is ready (weights loaded,
        transport connected); MscError naming the role if one of them fails meanwhile."""
        timeout_s = timeout_s or self.timeout_s * 4
        self._workdir = Path(tempfile.mkdtemp(prefix="msc-serve-"))
        token = secrets.token_hex(16)
        self._server = WaveServer(token)
        cfg = {**self._run_config, "serve": {"host": self._server.host, "port": self._server.port, "token": token}}
        try:
            self._procs = spawn_roles(self.bundle, self._workdir, cfg, self._env)
            self._links = self._server.accept(len(self.replicas), timeout_s, check=self._raise_if_a_role_died)
            for r, link in sorted(self._links.items()):
                msg = link.wait(timeout_s, on_idle=self._raise_if_a_role_died, idle_every_s=0.2)
                if not msg.get("ready"):
                    raise MscError(f"attention replica {r} did not report ready: {msg}")
        except BaseException:
            self._shutdown_processes(grace_s=0)
            raise
        self._threads = [threading.Thread(target=self._round_loop, name="msc-rounds", daemon=True),
                         threading.Thread(target=self._monitor, name="msc-monitor", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def close(self, grace_s: float = 30.0) -> None:
        """Stop taking requests, fail the queued ones, tell the replicas to stop and wait for every role
        process to end (killing what is left after grace_s)."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for req in queued:
            req.future.set_exception(MscError("the server is shutting down"))
        for t in self._threads:
            if t.name == "msc-rounds":
                t.join(timeout=self.wave_timeout_s)
        for link in self._links.values():
            try:
                link.send({"stop": True})
            except MscError:
                pass  # that replica is gone already
        self._shutdown_processes(grace_s)

    def __enter__(self) -> "ServingEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], max_new_tokens: int) -> Future:
        """Queue one greedy generation; the Future's result is a Completion (MscError if it fails)."""
        if not prompt:
            raise MscError("the prompt needs at least one token id")
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < self.vocab]
        if bad:
            raise MscError(f"token id {bad[0]!r} is outside the model's vocabulary [0, {self.vocab})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MscError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        req = _Request(list(prompt), max_new_tokens)
        with self._cv:
            if self._broken is not None:
                raise MscError(f"the server cannot take requests: {self._broken}")
            if self._closing:
                raise MscError("the server is shutting down")
            self._queue.append(req)
            self._cv.notify()
        return req.future

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Submit every prompt and wait for all of them (a convenience for scripts and tests)."""
        futures = [self.submit(p, max_new_tokens) for p in prompts]
        return [f.result(timeout=self.wave_timeout_s * (1 + len(prompts) // max(1, self.batch_size))).token_ids
                for f in futures]

    def health(self) -> dict:
        with self._cv:
            queued = len(self._queue)
        return {"status": "broken" if self._broken else "closing" if self._closing else "ok", "error": self._broken,
                "replicas": len(self.replicas), "roles": [r["name"] for r in self.bundle.roles],
                "batch_size": self.batch_size, "queued": queued, "waves": self.waves, "served": self.served}

    # ------------------------------------------------------------------ threads
    def _take_round(self) -> list[_Request] | None:
        """Up to batch_size requests per replica, once that many are queued or batch_window_s has passed
        since a request was first seen waiting; None when the engine closes or breaks."""
        most = self.batch_size * len(self.replicas)
        deadline = None
        with self._cv:
            while True:
                if self._closing or self._broken:
                    return None
                n, now = len(self._queue), time.monotonic()
                if n and deadline is None:
                    deadline = now + self.batch_window_s
                if n >= most or (n and now >= deadline):
                    return [self._queue.popleft() for _ in range(min(most, n))]
                self._cv.wait(timeout=deadline - now if n else 0.5)

    def _round_loop(self) -> None:
        round_no = 0
        while True:
            reqs = self._take_round()
            if reqs is None:
                return
            # NOTE: request i goes to replica i mod n, so a small round still spreads over the replicas
            waves = {r: reqs[r::len(self.replicas)] for r in range(len(self.replicas))}
            waves = {r: w for r, w in waves.items() if w}
            members = sorted(waves)
            deadline = time.monotonic() + self.wave_timeout_s
            try:
                for r, wave in waves.items():
                    self._links[r].send({"wave": round_no, "members": members, "prompts": [q.prompt for q in wave],
                                         "max_new_tokens": [q.max_new_tokens for q in wave]})
                for r, wave in waves.items():
                    msg = self._links[r].wait(max(0.0, deadline - time.monotonic()), on_idle=self._raise_if_broken,
                                              idle_every_s=0.2)
                    if "error" in msg:
                        raise MscError(f"attention replica {r}: {msg['error']}")
                    if msg.get("wave") != round_no or len(msg.get("outputs", ())) != len(wave):
                        raise MscError(f"attention replica {r} answered wave {msg.get('wave')!r} with "
                                       f"{len(msg.get('outputs', ()))} outputs; expected wave {round_no} with {len(wave)}")
                    now = time.monotonic()
                    for req, out in zip(wave, msg["outputs"]):
                        reason = "stop" if out and out[-1] in self.eos else "length"
                        req.future.set_result(Completion(out, reason, now - req.submitted, r))
                    self.waves += 1
                    self.served += len(wave)
            except MscError as e:
                # NOTE: a replica's link breaks when some role died; the process's exit names the culprit
                # better than the broken link does, so wait (briefly, bounded) for an exit status first.
                reason = self._broken or self._role_death(within_s=2.0) or str(e)
                for req in reqs:
                    if not req.future.done():
                        req.future.set_exception(MscError(reason))
                self._break(reason)
                return
            round_no += 1

    def _monitor(self) -> None:
        while not self._closing and self._broken is None:
            try:
                self._raise_if_a_role_died()
            except MscError as e:
                self._break(str(e))
                return
            with self._cv:
                self._cv.wait(timeout=0.1)

    def _raise_if_a_role_died(self) -> None:
        for role, p in self._procs:
            rc = p.poll()
            if rc is not None and not self._closing:
                raise MscError(f"role {role['name']} (rank {role['rank']}) exited with code {rc}: "
                               f"{role_log_tail(self._workdir, role)}")

    def _role_death(self, within_s: float) -> str | None:
        """The message of a role process that exited, waiting up to within_s for one; None if none did."""
        deadline = time.monotonic() + within_s
        while True:
            try:
                self._raise_if_a_role_died()
            except MscError as e:
                return str(e)
            if time.monotonic() >= deadline:
                return None
            with self._cv:
                self._cv.wait(timeout=0.05)

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise MscError(self._broken)

    def _break(self, reason: str) -> None:
        """Mark the engine broken: queued requests fail with `reason`, no new ones are taken."""
        with self._cv:
            if self._broken is None:
                self._broken = reason
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for req in queued:
            req.future.set_exception(MscError(self._broken))

    def _shutdown_processes(self, grace_s: float) -> None:
        stop_roles(self._procs, grace_s)
        for link in self._links.values():
            link.close()
        if self._server is not None:
            self._server.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
