"""What each role process does with its program: an attention replica runs the engine, an expert node serves.

An attention replica is one `Engine` (msc.engine) whose runner runs the attention program as stages, with
the experts behind the exchange (msc.runtime.exchange). It either works through a batch of prompts
(`run_batch`, what `msc run` gives it) or serves requests from a serving process over a link
(`serve`, msc.runtime.serving), taking them in and cancelling them between steps and streaming each
step's tokens back.

An expert node runs its program one MoE layer at a time on whatever tokens have arrived for that layer
(`ExpertRole.serve`), until every replica is done.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from msc.engine.engine import Engine
from msc.engine.request import Request, SamplingParams
from msc.errors import MscError
from msc.runtime import context, tensor_parallel
from msc.runtime.exchange import DEVICE_LAYER, AttentionExchange, ExpertExchange
from msc.runtime.staged import StagedProgram
from msc.runtime.trace import Trace


def sampling_from_json(d: dict) -> SamplingParams:
    """SamplingParams from a JSON object (a requests file, a serving link message); unknown keys refused."""
    known = set(SamplingParams.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise MscError(f"unknown sampling parameters {sorted(unknown)}; expected some of {sorted(known)}")
    d = dict(d)
    if "stop_token_ids" in d:
        d["stop_token_ids"] = tuple(d["stop_token_ids"] or ())
    return SamplingParams(**d)


class AttentionRole:
    """One attention replica: the engine, its exchange with the expert nodes, and the loops that feed it."""

    def __init__(self, engine: Engine, exchange: AttentionExchange):
        self.engine, self.exchange = engine, exchange
        self.on_step = None  # fault-injection hook for tests: called with the number of steps run

    def _after_step(self, _record=None) -> None:
        self.exchange.heartbeat()
        if self.on_step is not None:
            self.on_step(self.engine.step_no)

    def run_batch(self, prompts: list[list[int]], params: list[SamplingParams], arrivals: list[int]) -> list[Request]:
        """Every prompt to the end (prompt i joins at step arrivals[i]; one that can never run fails alone);
        then tell the expert nodes we are done."""
        done = self.engine.generate(prompts, params, arrivals, ids=[f"p{i}" for i in range(len(prompts))],
                                    on_step=self._after_step)
        self.exchange.finish()
        return done

    def serve(self, link) -> None:
        """Serve the requests a serving process sends over `link` until it says stop.

        Between steps every message waiting on the link is taken in ({"add": {...}}, {"cancel": id},
        {"stop": true}); each step's new tokens and finished requests go back as one {"events": [...]}
        message of [id, new tokens, finish reason or null, error or null, log-probabilities or null], with
        the engine's stats (running, waiting, KV pages). With nothing to do the replica
        blocks on the link, sending the expert nodes a heartbeat every exchange.heartbeat_s."""
        eng = self.engine
        events: list = []

        def on_token(req: Request, toks: list[int]) -> None:
            lps = req.logprobs[len(req.logprobs) - len(toks):] if req.params.logprobs is not None and toks else None
            events.append([req.id, toks, req.finish_reason, req.error, lps])
            if req.finished:
                eng.forget(req.id)

        link.send({"ready": True, "stats": eng.stats()})  # the pool's size is known before the first request
        tp = tensor_parallel.size() > 1
        stop = False
        while not stop:
            wait = 0.0 if eng.has_work else self.exchange.heartbeat_s
            msgs = []
            while True:
                msg = link.recv(wait)
                if msg is None:
                    break
                wait = 0.0
                msgs.append(msg)
            if tp:  # the other ranks of this replica's tp group take in the same messages, in the same step
                tensor_parallel.mirror_messages(msgs)
            stop = self._take_in(msgs, on_token, events)
            if not stop and eng.has_work:
                eng.step()
                self._after_step()
            elif not stop:
                self.exchange.heartbeat(force=True)
            if events:
                link.send({"events": events, "stats": eng.stats()})
                events = []
        self.exchange.finish()

    def serve_follower(self) -> None:
        """A tensor-parallel follower of a serving replica: the leader's messages each step, the same steps."""
        eng = self.engine

        def on_token(req: Request, toks: list[int]) -> None:
            if req.finished:
                eng.forget(req.id)

        stop = False
        while not stop:
            stop = self._take_in(tensor_parallel.mirror_messages(None), on_token, [])
            if not stop and eng.has_work:
                eng.step()

    def _take_in(self, msgs: list, on_token, events: list) -> bool:
        """Apply a serving link's messages to the engine; True once one says stop."""
        eng, stop = self.engine, False
        for msg in msgs:
            if msg.get("stop"):
                stop = True
            elif "cancel" in msg:
                eng.cancel(str(msg["cancel"]))
            elif "add" in msg:
                a = msg["add"]
                try:
                    eng.add_request(str(a["id"]), list(a["prompt"]), sampling_from_json(a.get("params") or {}), on_token)
                except MscError as e:
                    events.append([a.get("id"), [], "error", str(e), None])
            else:
                raise MscError(f"the server sent a message this replica does not understand: {sorted(msg)}")
        return stop

    def step_times(self) -> tuple[list[float], list[float]]:
        """Seconds of every step, and of the decode-only ones."""
        recs = [r for r in self.engine.records if r.tokens]
        return [r.seconds for r in recs], [r.seconds for r in recs if not r.prefill]


class ExpertRole:
    """Runs the expert program a layer at a time on whatever the replicas sent, until all of them are done."""

    def __init__(self, program: fx.GraphModule, comm: ExpertExchange, *, delay_s: float = 0.0, trace: Trace | None = None):
        self.program, self.comm = StagedProgram(program), comm
        self.delay_s = delay_s
        self.trace = trace or Trace("expert", 0, enabled=False)
        comm.trace = self.trace
        self.stage_of_layer = {layers[0]: s for s, layers in enumerate(self.program.stage_layers) if layers}
        # NOTE: the first call of any torch.library custom op imports torch._dynamo (0.6-1.2 s); done here, at
        # start-up, it stays out of the first request's time to first token
        import torch._dynamo  # noqa: F401
        self.batches = 0
        self.on_batch = None  # fault-injection hook for tests
        self.device_steps = None  # msc.runtime.device_exchange.ExpertDeviceSteps, when the run uses it

    def expert_recv(self, layer, hidden_size, top_k, dtype):
        batch = self.comm.expert_recv(layer, hidden_size, top_k, dtype)
        if self.delay_s > 0:  # the experts' stand-in compute (spec runtime.delay_ms)
            with self.trace.span("compute", "injected delay", layer, self.comm.mb, injected=True):
                time.sleep(self.delay_s / self.comm.microbatches)
        return batch

    def expert_send(self, hidden, layer):
        self.comm.expert_send(hidden, layer)

    def attention(self, *a):
        raise MscError("an expert node's program has no attention")

    dispatch = combine = mla_attention = attention

    def serve(self) -> int:
        """Run batches until every attention replica is done; returns how many."""
        prog = self.program
        with context.use(self), torch.no_grad():
            while True:
                layer = self.comm.next_layer()
                if layer is None:
                    break
                if layer == DEVICE_LAYER:
                    self._device_step(self.comm.device_msg)
                    continue
                stage = self.stage_of_layer.get(layer)
                if stage is None:
                    raise MscError(f"a replica sent tokens for layer {layer}, which has no experts on this node's program")
                with self.trace.span("compute", f"experts L{layer}", layer, self.comm.mb):
                    prog.run_stage(stage, prog.start())
                self.batches += 1
                if self.on_batch is not None:
                    self.on_batch(self.batches)
        return self.batches

    def _device_step(self, msg) -> None:
        if self.device_steps is None:
            raise MscError(f"rank {msg.replica} asked for a device-exchange step, but this expert node runs without "
                           "one (every role must see the same MSC_DEVICE_EXCHANGE)")
        with self.trace.span("compute", f"device step {msg.step}", None, None):
            self.device_steps.run(msg.replica, msg.step, msg.n, msg.m, eager=bool(msg.mb))
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.batches)
