"""The device exchange: a decode step of the two roles as one CUDA graph on each side, hand-offs on the GPU.

The host exchange (msc.runtime.exchange) picks each expert node's tokens on the host and moves them as
messages: every layer costs each side a host round trip, and on one GPU the two processes' kernels wait
for each other's hosts. Here, for decode-only steps, each (attention replica, expert node) pair shares
fixed mailboxes in GPU memory (CUDA IPC) and the hand-offs are device flags (backends/comm/device_flags):

  expert node's memory (the forward area)     flags [L * 8] | per micro-batch: hidden [R, H], ids [R, K] int64,
                                              weights [R, K] f32
  replica's memory (the return area)          flags [L * 8] | per micro-batch: out [R, H]
(R: the larger of the plan's batch and runtime.max_step_tokens: 8192 rows of Mixtral-8x7B's 4096 bf16 are
64 MB an area and micro-batch.)

`dispatch(layer, mb)` copies the micro-batch's hidden states and routing into every expert node's forward
area and signals flag (layer, mb) with the step's epoch; `combine(layer, mb)` waits on the return area's
flag and sums the nodes' partial outputs. The expert node runs its program stage by stage with `expert_recv`
= wait + views of the forward area and `expert_send` = copy into the replica's return area + signal. Both
sides run the same ping-pong order, so each is one linear stream of kernels: the attention role captures
its whole step (every stage of every micro-batch) as a CUDA graph per (micro-batches, batch bucket), the
expert node its whole step likewise. Per step the host sends each expert node one control message
(epoch, bucket, micro-batches) over the host exchange, then replays. Prompt and mixed steps go the same
way, run eagerly on both sides (their token counts vary: no graphs), so no step's tokens take the host path.

NOTE: every token goes to every expert node (the routing stays on the device: no host picks tokens); the
experts op ignores ids outside a node's slice, so each node's output is its partial sum. With several
expert nodes that moves more bytes than the host path's selection; with top-2 of 8 experts over 2 nodes
most tokens go to both anyway.

NOTE: a step is one execution on both sides, whatever the graph state: the first time a (bucket, m) key is
seen both run it eagerly (the warm-up: Triton compiles, cuBLAS chooses), the second time they capture and
replay. Each execution has a fresh epoch, and flags only grow, so no flag is ever reset.

Where it runs (`MSC_DEVICE_EXCHANGE`: auto, on, off): `auto` turns it on for CUDA roles over cuda_ipc with
one attention replica, no tensor parallelism and no injected delays, when the roles run on different GPUs
or under MPS (on one GPU without MPS the two processes time-slice it, and a spinning wait holds its slice:
benchmarks/device_flags_pingpong.py measured 3.3x a one-process step without MPS, 1.16x with it, H100).
`on` forces it wherever the roles are on one host with one replica (also on the CPU, where the areas are /dev/shm files and
the flags Python loops: how the tests check the protocol).

Verified: on one H100 and one H200 (two and three role processes on the GPU, under MPS and forced on
without it; tests/engine/test_engine_gpu.py, benchmarks/engine_step.py) and on the CPU. Not yet run across
two GPUs (peer access through the IPC mappings), where `auto` turns it on.

NOTE: one attention replica only (the host exchange serves several). An expert node runs a device step
start to end on its stream, so with two replicas and two expert nodes node A could be inside replica 1's
step (waiting for its next layer) while node B is inside replica 2's: replica 1 waits for B and replica 2
for A, a cycle. Several replicas need steps whose layers interleave across replicas at every node (one
graph per set of replicas, or a device-side scheduler): not built.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

from msc import env as msc_env
from msc.backends.comm.device_flags import flags_for
from msc.backends.comm.m2n import PeerError, fetch_key
from msc.errors import MscError
from msc.runtime.exchange import MAX_MICROBATCHES  # slots per layer: the exchange's micro-batch limit

ENV = "MSC_DEVICE_EXCHANGE"
_ALIGN = 256


@dataclass(frozen=True)
class Dims:
    """What sizes the areas: the model's hidden size, top-k and dtype, its layer count, the largest micro-batch
    (rows) and the run's micro-batch count."""

    hidden: int
    top_k: int
    dtype: torch.dtype
    layers: int
    max_rows: int
    microbatches: int

    @property
    def slots(self) -> int:
        return self.layers * MAX_MICROBATCHES


def slot(layer: int, mb: int) -> int:
    return layer * MAX_MICROBATCHES + mb


def mode() -> str:
    return msc_env.choice(ENV)


def wanted(*, device: str, transport: str, replicas: int, tp_size: int, delays: bool, distinct_gpus: bool,
           one_host: bool) -> bool:
    """Whether this run's roles use the device exchange (every role decides alike from the same facts).
    `on` where it cannot run is an error naming why, not a silent fallback."""
    m = mode()
    if m == "off":
        return False
    blockers = [why for why, bad in (
        (f"{replicas} attention replicas (it serves one)", replicas > 1),
        (f"tensor parallelism (tp = {tp_size})", tp_size > 1),
        ("injected delays (runtime.delay_ms)", delays),
        ("roles on several hosts", not one_host),
        (f"transport {transport} (it needs cuda_ipc, or shm on the CPU)", transport not in ("cuda_ipc", "shm")),
    ) if bad]
    if m == "on":
        if blockers:
            raise MscError(f"{ENV}=on, but the device exchange cannot run with {'; '.join(blockers)}")
        return True
    mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
    return not blockers and device == "cuda" and transport == "cuda_ipc" and (mps or distinct_gpus)


# ---------------------------------------------------------------------- areas
def _layout(kind: str, d: Dims) -> tuple[list[tuple[str, int, torch.dtype, tuple]], int]:
    """(name, byte offset, dtype, shape) of each part of a forward ("fwd") or return ("ret") area; its bytes."""
    parts = [("flags", torch.int64, (d.slots,))]
    for mb in range(d.microbatches):
        if kind == "fwd":
            parts += [(f"hidden{mb}", d.dtype, (d.max_rows, d.hidden)), (f"ids{mb}", torch.int64, (d.max_rows, d.top_k)),
                      (f"weights{mb}", torch.float32, (d.max_rows, d.top_k))]
        else:
            parts += [(f"out{mb}", d.dtype, (d.max_rows, d.hidden))]
    out, at = [], 0
    for name, dt, shape in parts:
        out.append((name, at, dt, shape))
        at += (_nbytes(dt, shape) + _ALIGN - 1) // _ALIGN * _ALIGN
    return out, at


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()


class Area:
    """Typed views of one shared byte buffer (this process's own, or a peer's mapped here)."""

    def __init__(self, buf: Tensor, kind: str, d: Dims):
        layout, _ = _layout(kind, d)
        self.views = {name: buf[at:at + _nbytes(dt, shape)].view(dt).view(shape) for name, at, dt, shape in layout}

    def __getitem__(self, name: str) -> Tensor:
        return self.views[name]


def _allocate(kind: str, d: Dims, device: torch.device, name: str) -> tuple[Tensor, str]:
    """A zeroed buffer for an area, and the text a peer maps it with."""
    _, nbytes = _layout(kind, d)
    if device.type == "cuda":
        from msc.backends.comm.cuda_ipc import _alloc_ring, _export

        buf = _alloc_ring(nbytes, device)
        buf.zero_()
        torch.cuda.synchronize(device)
        return buf, _export(buf)
    from msc.runtime.lifecycle import shm_name_prefix

    path = f"/dev/shm/{shm_name_prefix()}devx-{secrets.token_hex(6)}-{name}"
    buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    buf.zero_()
    return buf, path


def _map(kind: str, d: Dims, device: torch.device, text: str, rank: int, peer: int) -> Tensor:
    _, nbytes = _layout(kind, d)
    if device.type == "cuda":
        from msc.backends.comm.cuda_ipc import _import

        return _import(text, device, nbytes, rank, peer)
    if not text.startswith("/dev/shm/") or not os.path.exists(text) or os.path.getsize(text) != nbytes:
        raise MscError(f"device exchange: rank {peer}'s area {text!r} is missing or not {nbytes} bytes "
                       "(every role must run the same bundle and micro-batch count)")
    return torch.from_file(text, shared=True, size=nbytes, dtype=torch.uint8)


class Links:
    """This role's areas and its peers' areas as mapped here, per peer rank; the flags, the epoch, the error word."""

    def __init__(self, own: dict[int, Area], theirs: dict[int, Area], device: torch.device, timeout_s: float,
                 paths: list[str]):
        self.own, self.theirs, self.device = own, theirs, device
        self.error = torch.zeros(1, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self.flags = flags_for(device, self.error, timeout_s)
        self.timeout_s = timeout_s
        self._paths = paths

    def failed_wait(self) -> str | None:
        """'layer L, micro-batch M' of a wait that expired since the last check (the error word is cleared),
        else None."""
        e = int(self.error.item())
        if e == 0:
            return None
        self.error.zero_()
        layer, mb = divmod(e - 1, MAX_MICROBATCHES)
        return f"layer {layer}, micro-batch {mb}"

    def close(self) -> None:
        for p in self._paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._paths = []


def connect(store, rank: int, peers: list[int], kind: str, d: Dims, device, timeout_s: float,
            prefix: str = "devx") -> Links:
    """Make this role's areas (attention: a return area per expert node; expert: a forward area per replica),
    publish them in the rendezvous store, map the peers'. Both sides call it after their M2N endpoint."""
    device = torch.device(device)
    own_kind, their_kind = ("ret", "fwd") if kind == "attention" else ("fwd", "ret")
    own, paths = {}, []
    for p in peers:
        buf, text = _allocate(own_kind, d, device, f"{own_kind}-{rank}-{p}")
        own[p] = Area(buf, own_kind, d)
        if device.type == "cpu":
            paths.append(text)
        store.set(f"{prefix}/{rank}/{p}", text)
    theirs = {}
    for p in peers:
        text = fetch_key(store, f"{prefix}/{p}/{rank}", timeout_s, f"device exchange: rank {p} did not publish its area")
        theirs[p] = Area(_map(their_kind, d, device, text, rank, p), their_kind, d)
    # NOTE: a /dev/shm file is unlinked at its owner's close, after the run: every peer mapped it here, before
    # any step could run
    return Links(own, theirs, device, timeout_s, paths)


def dims_of(manifest: dict, microbatches: int) -> Dims:
    """The areas of a bundle's run: a micro-batch of a decode step holds up to the plan's batch, one of a
    prompt step up to runtime.max_step_tokens tokens."""
    from msc.ir import DTYPES

    model = manifest["model"]
    rows = max(manifest["plan"]["batch_size"], manifest["spec"]["runtime"].get("max_step_tokens") or 8192)
    return Dims(model["hidden_size"], model["top_k"], DTYPES[model["dtype"]], model["num_hidden_layers"],
                rows, microbatches)


# ---------------------------------------------------------------------- attention side
class AttentionDeviceExchange:
    """The replica's end: dispatch / combine as copies and flags, called inside the runner's step graph."""

    def __init__(self, links: Links, host_exchange, expert_ranks: list[int]):
        self.links, self.host, self.expert_ranks = links, host_exchange, expert_ranks
        self.mb = 0
        self.epoch_no = 0

    def begin(self, rows: int, microbatches: int, eager: bool = False) -> None:
        """Before a step's execution: a fresh epoch on the device, and each expert node told to run its side
        (`eager`: a prompt or mixed step, run without graphs on both sides; rows: its largest micro-batch)."""
        if rows > self.links.theirs[self.expert_ranks[0]]["hidden0"].shape[0]:
            raise MscError(f"a micro-batch of {rows} rows is larger than the device exchange's areas")
        self.epoch_no += 1
        self.links.epoch.fill_(self.epoch_no)
        self.host.device_step(self.epoch_no, rows, microbatches, eager)

    def check(self) -> None:
        """After the step's results were read: a wait that expired is the expert node's failure."""
        where = self.links.failed_wait()
        if where is not None:
            raise PeerError(f"device exchange: no expert node answered {where} of epoch {self.epoch_no} within {self.links.timeout_s:.0f} s (expert ranks {self.expert_ranks}: "
                            "has one died?)")

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        if len(bounds) != len(self.expert_ranks) + 1:
            raise MscError(f"layer {layer}: placement has {len(bounds) - 1} expert nodes, the run has {len(self.expert_ranks)}")
        t, mb, lk = hidden.shape[0], self.mb, self.links
        for r in self.expert_ranks:
            area = lk.theirs[r]
            area[f"hidden{mb}"][:t].copy_(hidden)  # [T, H]
            area[f"ids{mb}"][:t].copy_(idx)  # [T, K]
            area[f"weights{mb}"][:t].copy_(weights)  # [T, K] f32
            lk.flags.signal(area["flags"], slot(layer, mb), lk.epoch)
        return torch.tensor([layer], dtype=torch.int64)

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        t, mb, lk = hidden.shape[0], self.mb, self.links
        out = None
        for r in self.expert_ranks:
            area = lk.own[r]
            lk.flags.wait(area["flags"], slot(layer, mb), lk.epoch)
            part = area[f"out{mb}"][:t]  # [T, H]
            out = part.clone() if out is None else out.add_(part)
        return out


# ---------------------------------------------------------------------- expert side
class ExpertDeviceSteps:
    """The expert node's end: runs its program's stages for a replica's device step, eagerly the first time a
    (replica, bucket, m) is seen, then from a CUDA graph."""

    def __init__(self, links: Links, program):
        self.links, self.program = links, program
        self.replica, self.mb, self.rows = None, 0, 0
        self._seen: dict[tuple, object] = {}  # key -> None (ran eagerly once) or its graph
        self._pool = None

    # the runtime context of the expert program during a device step
    def expert_recv(self, layer, hidden_size, top_k, dtype):
        lk, area, mb, n = self.links, self.links.own[self.replica], self.mb, self.rows
        lk.flags.wait(area["flags"], slot(layer, mb), lk.epoch)
        # NOTE: copies, not views: a custom op's outputs may not alias each other (one buffer holds all three)
        return (area[f"hidden{mb}"][:n].clone(), area[f"ids{mb}"][:n].clone(),  # [n, H], [n, K]
                area[f"weights{mb}"][:n].clone())  # [n, K]

    def expert_send(self, hidden, layer):
        lk, area, mb = self.links, self.links.theirs[self.replica], self.mb
        area[f"out{mb}"][: hidden.shape[0]].copy_(hidden)  # [n, H]
        lk.flags.signal(area["flags"], slot(layer, mb), lk.epoch)

    def attention(self, *a):
        raise MscError("an expert node's program has no attention")

    dispatch = combine = mla_attention = attention

    def _body(self, microbatches: int) -> None:
        from msc.runtime import context
        from msc.runtime.staged import ping_pong

        prog = self.program
        with context.use(self), torch.no_grad():
            for stage, mb in ping_pong(prog.num_stages, microbatches):
                self.mb = mb
                prog.run_stage(stage, prog.start())

    def run(self, replica: int, epoch: int, rows: int, microbatches: int, eager: bool = False) -> None:
        """Replica `replica`'s step `epoch` (rows per micro-batch, micro-batch count; `eager`: a prompt or mixed
        step, never captured): queued on this node's stream; the host goes back to its messages at once.

        NOTE: in an eager step the micro-batches may hold fewer rows than `rows` (their largest): the node
        computes `rows` rows of each, the ones past a micro-batch's end on stale area contents (finite values a
        replica wrote before, or zeros), which the replica never reads back."""
        lk = self.links
        where = lk.failed_wait()  # the previous device step's waits (finished by now: the replica saw its results)
        if where is not None:
            raise PeerError(f"device exchange: replica rank {self.replica} sent nothing for {where} within "
                            f"{lk.timeout_s:.0f} s")
        if replica not in lk.own:
            raise MscError(f"rank {replica} asked for a device step but has no device link with this expert node")
        self.replica, self.rows = replica, rows
        lk.epoch.fill_(epoch)
        key = (replica, rows, microbatches)
        if lk.device.type != "cuda" or eager:
            self._body(microbatches)
            return
        if key not in self._seen:
            self._seen[key] = None
            self._body(microbatches)  # the warm-up, computing this very step
            return
        graph = self._seen[key]
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._body(microbatches)
            self._seen[key] = graph
        graph.replay()
