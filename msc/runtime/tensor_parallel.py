"""The tensor-parallel group of this process: the ranks that share one attention replica's or one expert
node's layers.

A role process that is one of tp ranks joins its group once at start (`make_group` + `join`); the
`msc::tp_all_reduce` op of its program then sums partial results over the group (gloo on the CPU, NCCL on
a GPU). Outside a group (tp = 1, or a program run in a test without one) the op is the identity.

NOTE: a group's M2N endpoint is its tp rank 0 (the leader). A replica's leader alone dispatches the step's
tokens to the expert nodes and gathers their answers, then broadcasts the combined hidden states to the
other ranks (`LeaderExchange` / `FollowerExchange`); an expert node's leader broadcasts each batch it takes
(`ExpertLeaderExchange` / `ExpertFollowerExchange`) and alone answers. So no byte crosses the network twice
and each side sees one peer per replica or node, as without tp. Every rank of a replica runs the same
engine on the same requests (the leader forwards what its serving link brings, `mirror_messages`), so their
schedules, KV pages and sampled tokens agree without further messages: the logits are the same numbers on
every rank (the vocabulary-parallel LM head's all-gather), and sampling is a pure function of them and the
request's seed.
"""
from __future__ import annotations

import json
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from msc.errors import MscError

_group: dict = {"pg": None, "rank": 0, "size": 1}


def join(pg, rank: int, size: int) -> None:
    """Make `pg` (a torch.distributed process group of `size` ranks, this one `rank`) this process's tp group."""
    _group.update(pg=pg, rank=rank, size=size)


def leave(clean: bool) -> None:
    """Leave the group at the end of the run. clean: every rank got here (a last barrier first, so none
    tears the group down while another still uses it); then the group is shut down explicitly, not left to
    the interpreter's exit (where gloo's threads could abort the process)."""
    pg = _group["pg"]
    _group.update(pg=None, rank=0, size=1)
    if pg is None:
        return
    try:
        if clean:
            pg.barrier().wait()
        pg.shutdown()
    except RuntimeError:
        pass  # a peer is gone already: nothing left to coordinate with


def rank() -> int:
    return _group["rank"]


def size() -> int:
    return _group["size"]


def make_group(store, tp: dict, device: str, timeout: timedelta, gpu_of=None):
    """The process group of this rank's tp group ({"rank", "size", "ranks"} of its role), on its own
    prefix of the run's TCPStore: gloo on the CPU, NCCL on a GPU, which needs one GPU per rank: gpu_of(rank)
    gives a global rank's GPU index where it is known (one host), and a group whose ranks share one is refused."""
    if str(device).startswith("cuda") and gpu_of is not None:
        gpus = [gpu_of(r) for r in tp["ranks"]]
        if len(set(gpus)) < len(gpus):
            raise MscError(f"tensor parallelism on GPUs needs one GPU per rank of a group; ranks {tp['ranks']} "
                           f"would share GPUs {gpus} on this host (run tp > 1 on a machine with more GPUs, or "
                           "compile with plan tp 1)")
    prefix = dist.PrefixStore(f"msc-tp-{tp['ranks'][0]}/", store)
    if str(device).startswith("cuda"):
        # NOTE: unverified on hardware so far (one GPU per rank is needed); the CPU path is tested through gloo
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefix, tp["rank"], tp["size"], opts)
    return dist.ProcessGroupGloo(prefix, tp["rank"], tp["size"], timeout)


def all_reduce(x: Tensor) -> Tensor:
    """The sum of x over the group (a new tensor; x itself is left as it was)."""
    if _group["pg"] is None or _group["size"] == 1:
        return x
    out = x.contiguous().clone()
    # NOTE: reduced in float32 when x is a lower precision on the CPU (gloo sums bf16 poorly); on a GPU NCCL
    # sums in the tensor's own dtype, as every tensor-parallel engine does
    wide = out.float() if out.device.type == "cpu" and out.dtype in (torch.bfloat16, torch.float16) else out
    _wait(_group["pg"].allreduce([wide]), "all-reduce")
    return wide.to(x.dtype) if wide is not out else out


def all_gather(x: Tensor, dim: int) -> Tensor:
    """The group's x side by side along dim, in rank order (x itself outside a group)."""
    if _group["pg"] is None or _group["size"] == 1:
        return x
    src = x.contiguous()
    parts = [torch.empty_like(src) for _ in range(_group["size"])]
    _wait(_group["pg"].allgather([parts], [src]), "all-gather")
    return torch.cat(parts, dim=dim)


def broadcast_(x: Tensor, root: int = 0) -> Tensor:
    """x on every rank of the group becomes the root's x (in place)."""
    _wait(_group["pg"].broadcast(x, root), "broadcast")
    return x


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as e:  # a rank died or hung: the group's timeout expired
        raise MscError(f"tensor-parallel {what} failed (a rank of this replica's tp group died or hung): {e}") from None


def mirror_messages(messages: list | None) -> list:
    """The leader's list of serving messages, on every rank of the group (the leader passes its list, the
    others None): JSON bytes, their length first."""
    leader = _group["rank"] == 0
    data = json.dumps(messages).encode() if leader else b""
    n = broadcast_(torch.tensor([len(data)], dtype=torch.int64))
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if leader else torch.empty(int(n.item()), dtype=torch.uint8)
    if int(n.item()):
        broadcast_(buf)
    return messages if leader else json.loads(bytes(buf.numpy()).decode() or "[]")


class _Wrapped:
    """An exchange that is its leader's own (reads and writes of its attributes go to it), plus broadcasts."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


class LeaderExchange(_Wrapped):
    """The leader's exchange: the replica's own (to the expert nodes), whose combined results it broadcasts."""

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        return broadcast_(self.inner.combine(ticket, hidden, layer).contiguous())  # [T, H]


class FollowerExchange:
    """A follower's exchange: it sends nothing; each combine takes the leader's combined hidden states."""

    def __init__(self, heartbeat_s: float):
        self.heartbeat_s = heartbeat_s
        self.step, self.mb, self.microbatches = 0, 0, 1
        self.trace = None

    def begin_step(self, step: int, microbatches: int) -> None:
        self.step, self.microbatches = step, microbatches

    def dispatch(self, hidden: Tensor, idx: Tensor, weights: Tensor, layer: int, bounds: list[int]) -> Tensor:
        return torch.tensor([layer], dtype=torch.int64)

    def combine(self, ticket: Tensor, hidden: Tensor, layer: int) -> Tensor:
        return broadcast_(torch.empty_like(hidden))  # [T, H]

    def heartbeat(self, force: bool = False) -> None:
        pass

    def finish(self) -> None:
        pass


class ExpertLeaderExchange(_Wrapped):
    """An expert node's leader: its own exchange with the replicas; each batch it takes (layer, tokens, routing)
    goes to its followers, which compute their share of the same experts on it."""

    def next_layer(self) -> int | None:
        layer = self.inner.next_layer()
        broadcast_(torch.tensor([-1 if layer is None else layer, self.inner.mb], dtype=torch.int64))
        return layer

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype) -> tuple[Tensor, Tensor, Tensor]:
        hidden, idx, weights = self.inner.expert_recv(layer, hidden_size, top_k, dtype)
        hidden, idx, weights = hidden.to(dtype), idx.long(), weights.float()  # the dtypes the followers expect
        broadcast_(torch.tensor([hidden.shape[0]], dtype=torch.int64))
        return broadcast_(hidden.contiguous()), broadcast_(idx.contiguous()), broadcast_(weights.contiguous())


class ExpertFollowerExchange:
    """An expert node's follower: the batches its leader took, no sends (the leader answers the replicas)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.mb, self.microbatches = 0, 1
        self.trace = None

    def next_layer(self) -> int | None:
        head = broadcast_(torch.empty(2, dtype=torch.int64))
        layer, self.mb = int(head[0]), int(head[1])
        return None if layer < 0 else layer

    def expert_recv(self, layer: int, hidden_size: int, top_k: int, dtype) -> tuple[Tensor, Tensor, Tensor]:
        n = int(broadcast_(torch.empty(1, dtype=torch.int64)).item())
        hidden = torch.empty(n, hidden_size, dtype=dtype, device=self.device)  # [n, H]
        idx = torch.empty(n, top_k, dtype=torch.int64, device=self.device)  # [n, K]
        weights = torch.empty(n, top_k, dtype=torch.float32, device=self.device)  # [n, K]
        return broadcast_(hidden), broadcast_(idx), broadcast_(weights)

    def expert_send(self, hidden: Tensor, layer: int) -> None:
        pass
