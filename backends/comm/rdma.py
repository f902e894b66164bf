"""RDMA transport: RC queue pairs and "RDMA write with immediate into pre-registered receive buffers".

UNTESTED: written against the pyverbs documentation and rdma-core's own pyverbs tests, never run on an
RDMA device. pyverbs is the Python binding that ships with rdma-core (distribution package
python3-pyverbs; it is not an ordinary PyPI package), so it is imported only inside `connect_rdma`.

The model is the shm transport's, with the NIC doing the copy. Per pair of ranks there is one RC queue
pair, and per direction one byte ring:

  receiver  ring MR     `capacity` bytes, REMOTE_WRITE: only the sender writes into it (via the NIC)
  sender    stage MR    `capacity` bytes, a mirror of the ring: byte position p is staged at p % capacity
  both      ctrl MR     RQ_DEPTH receive slots + CTRL_SLOTS send slots + probe words, SLOT bytes each

Sending copies bytes into the stage and posts RDMA_WRITE_WITH_IMM to the peer's ring at the same offset,
the immediate carrying the byte count (a write that crosses the ring end is split in two). The receiver
keeps RQ_DEPTH receive WRs posted; each write consumes one and completes on its CQ with the count, which
advances the write position the receiver knows; the completion is the only signal (the NIC places the
bytes before it reports them), so nothing polls memory. The receiver returns credit with a small SEND
into one of the sender's receive slots: [read position, data writes polled, flags] as uint64, absolute
values, so a late or merged credit is harmless. Credits go out only after a quarter ring or a quarter
window of progress, so small messages cost one write each and no credit traffic.

Dead peers: a completion with an error status (retry exceeded, flushed, ...) kills the channel and its
status becomes part of its name. A process that only receives never posts anything that could fail, so
`alive()` probes the peer with an 8-byte RDMA write every PROBE_S seconds; when the peer is gone the NIC
gives up after its retries (timeout 14 is ~67 ms, 8 tries) and the probe completes with an error.
`close()` waits for posted writes, then tells the peer with a flag in a last credit message.

Timeouts and framing are StreamEndpoint's (m2n.py): nothing here blocks except a bounded drain in close().
Device choice: `device_name`, else $MSC_RDMA_DEVICE, else the first device whose `port` is active.
"""
from __future__ import annotations

import ctypes
import json
import random
import socket
import time
from collections import deque
from types import SimpleNamespace

import numpy as np

from msc import env as msc_env
from msc.backends.comm.m2n import DEFAULT_TIMEOUT_S, StreamEndpoint, fetch_key
from msc.errors import MscError

DEFAULT_CAPACITY = 4 << 20
WINDOW = 128  # data writes a sender may have outstanding that the receiver has not polled (its receive WRs)
CTRL_SLOTS = 16  # control messages (credits, close notice) in flight per channel
# NOTE: a receiver's queue takes the peer's data writes (<= WINDOW, enforced by the polled-count credit) and
# its control messages (<= CTRL_SLOTS in flight + a few the thresholds allow before we poll): 2x is ample.
RQ_DEPTH = WINDOW + 2 * CTRL_SLOTS
SQ_DEPTH = WINDOW + CTRL_SLOTS + 4
SLOT = 32  # bytes of one control message: 4 x uint64 [read_pos, polled, flags, 0]
CTRL_BYTES = (RQ_DEPTH + CTRL_SLOTS + 2) * SLOT  # receive slots, send slots, probe source, probe sink
PROBE_OFF, SINK_OFF = (RQ_DEPTH + CTRL_SLOTS) * SLOT, (RQ_DEPTH + CTRL_SLOTS + 1) * SLOT
PROBE_S = 0.2
POLL_BATCH = 32
F_CLOSED = 1
_DATA, _CTRL, _PROBE = 0, 1, 2  # kinds of send WRs in flight
_WC_STATUS = {1: "local length error", 4: "local protection error", 5: "work request flushed",
              10: "remote access error", 12: "transport retry counter exceeded (peer gone or unreachable)",
              13: "receiver-not-ready retry counter exceeded"}
_MISSING = ("the rdma transport needs pyverbs (rdma-core's python3-pyverbs package) and an RDMA device; "
            "found none: {}")


def _load_pyverbs() -> SimpleNamespace:
    try:
        import pyverbs.device as d
        import pyverbs.enums as e
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.cq import CQ, WC
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.pyverbs_error import PyverbsError
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        from pyverbs.wr import SGE, RecvWR, SendWR
    except ImportError as err:
        raise MscError(_MISSING.format(f"cannot import pyverbs ({err})")) from None
    if not (hasattr(SendWR, "imm_data") and hasattr(WC, "imm_data")):
        raise MscError("the rdma transport needs a newer pyverbs: this one has no immediate data on SendWR / WC")
    return SimpleNamespace(d=d, e=e, GID=GID, AHAttr=AHAttr, GlobalRoute=GlobalRoute, CQ=CQ, MR=MR, PD=PD, QP=QP,
                           QPAttr=QPAttr, QPCap=QPCap, QPInitAttr=QPInitAttr, SGE=SGE, RecvWR=RecvWR, SendWR=SendWR,
                           Error=PyverbsError)


def _view(mr, nbytes: int) -> np.ndarray:
    """A writable uint8 numpy view of an MR's own buffer (pyverbs allocates it page-aligned)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(mr.buf))


class RdmaChannel:
    """Both directions to one peer over one RC queue pair (see the module docstring for the protocol)."""

    def __init__(self, v: SimpleNamespace, ctx, pd, port: int, peer: int, capacity: int):
        e = v.e
        self.v, self.port, self.peer, self.capacity = v, port, peer, capacity
        self.cq = v.CQ(ctx, SQ_DEPTH + RQ_DEPTH, None, None, 0)  # one CQ for both queues: never overflows
        cap = v.QPCap(max_send_wr=SQ_DEPTH, max_recv_wr=RQ_DEPTH, max_send_sge=1, max_recv_sge=1)
        init = v.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
        attr = v.QPAttr(port_num=port)
        attr.pkey_index = 0
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.qp = v.QP(pd, init, attr)  # given a QPAttr, pyverbs takes an RC QP to INIT
        rw = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.ring_mr, self.ctrl_mr = v.MR(pd, capacity, rw), v.MR(pd, CTRL_BYTES, rw)
        self.stage_mr = v.MR(pd, capacity, e.IBV_ACCESS_LOCAL_WRITE)
        self.ring, self.stage = _view(self.ring_mr, capacity), _view(self.stage_mr, capacity)  # [capacity] uint8
        self.ctrl64 = _view(self.ctrl_mr, CTRL_BYTES).view(np.uint64)  # [CTRL_BYTES / 8]
        self.psn = random.getrandbits(24)
        self.name = f"rdma {ctx.name}:{port} qp {self.qp.qp_num:#x}"
        # NOTE: the receive WRs are built once and re-posted by slot (wr_id = slot); pyverbs copies the SGE.
        self._recv_wrs = [v.RecvWR(wr_id=i, num_sge=1, sg=[v.SGE(self.ctrl_mr.buf + i * SLOT, SLOT, self.ctrl_mr.lkey)])
                          for i in range(RQ_DEPTH)]
        for wr in self._recv_wrs:  # posted in INIT, before the peer can send anything
            self.qp.post_recv(wr)
        self._w_pos = self._peer_read = self._staged = self._writes = self._peer_polled = 0  # sending side
        self._r_pos = self._known_w = self._polled = self._sent_read = self._sent_polled = 0  # receiving side
        self._inflight: deque[tuple[int, int]] = deque()  # (kind, value) of posted send WRs, completion order
        self._ctrl_posted = self._ctrl_done = 0
        self._probing, self._last_probe = False, 0.0
        self.dead: str | None = None
        self._peer_closed = self._closed = False
        self._remote: dict = {}

    def connect(self, me: dict, peer: dict, gid_index: int, use_grh: bool) -> None:
        """INIT -> RTR -> RTS towards the peer's QP (the values the peer published)."""
        v = self.v
        attr = v.QPAttr(port_num=self.port)
        attr.path_mtu = min(me["mtu"], peer["mtu"])
        attr.dest_qp_num, attr.rq_psn = peer["qpn"], peer["psn"]
        attr.max_dest_rd_atomic, attr.min_rnr_timer = 1, 12
        gr = v.GlobalRoute(dgid=v.GID(peer["gid"]), sgid_index=gid_index, hop_limit=64) if use_grh else None
        attr.ah_attr = v.AHAttr(dlid=peer["lid"], is_global=1 if use_grh else 0, port_num=self.port, gr=gr)
        self.qp.to_rtr(attr)
        # NOTE: rnr_retry 7 retries forever: a receiver that is merely slow to re-post never kills the link.
        attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.sq_psn, attr.max_rd_atomic = 14, 7, 7, self.psn, 1
        self.qp.to_rts(attr)
        self._remote = peer
        self.name = f"{self.name}->{peer['qpn']:#x}"

    # ------------------------------------------------------------------ work requests and completions
    def _post(self, opcode, addr: int, length: int, lkey: int, kind: int, value: int, remote=None, imm=None) -> bool:
        v = self.v
        wr = v.SendWR(wr_id=kind, opcode=opcode, num_sge=1, sg=[v.SGE(addr, length, lkey)])
        if remote is not None:
            wr.set_wr_rdma(*remote)  # (rkey, remote address)
        if imm is not None:
            wr.imm_data = socket.htonl(imm)  # the wire carries it big-endian; the peer applies ntohl
        try:
            self.qp.post_send(wr)
        except v.Error as err:
            self._fail(f"post_send failed: {err}")
            return False
        self._inflight.append((kind, value))
        return True

    def _fail(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
            self.name = f"{self.name}: {reason}"

    def _poll(self) -> None:
        e = self.v.e
        while self.dead is None and not self._closed:
            try:
                n, wcs = self.cq.poll(POLL_BATCH)
            except self.v.Error as err:
                return self._fail(f"poll_cq failed: {err}")
            for wc in wcs:
                if wc.status != e.IBV_WC_SUCCESS:  # opcode is undefined here; the first error is the cause
                    return self._fail(f"{_WC_STATUS.get(wc.status, f'completion status {wc.status}')} "
                                      f"(vendor error {wc.vendor_err:#x})")
                if wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:  # peer's data landed in our ring
                    self._known_w += socket.ntohl(wc.imm_data)
                    self._polled += 1
                    self._repost(wc.wr_id)
                elif wc.opcode == e.IBV_WC_RECV:  # a control message in receive slot wr_id
                    read_pos, polled, flags = (int(x) for x in self.ctrl64[wc.wr_id * 4 : wc.wr_id * 4 + 3])
                    self._peer_read, self._peer_polled = max(self._peer_read, read_pos), max(self._peer_polled, polled)
                    self._peer_closed |= bool(flags & F_CLOSED)
                    self._repost(wc.wr_id)
                else:  # our send queue, completing in posting order
                    kind, value = self._inflight.popleft()
                    if kind == _DATA:
                        self._staged = value
                    elif kind == _CTRL:
                        self._ctrl_done += 1
                    else:
                        self._probing = False
            if n < POLL_BATCH:
                break
        self._credit()

    def _repost(self, slot: int) -> None:
        try:
            self.qp.post_recv(self._recv_wrs[slot])
        except self.v.Error as err:
            self._fail(f"post_recv failed: {err}")

    def _credit(self, flags: int = 0) -> bool:
        """Send [read position, writes polled, flags] when due; False if it had to wait for a free slot."""
        due = (flags or self._r_pos - self._sent_read >= self.capacity // 4
               or self._polled - self._sent_polled >= WINDOW // 4)
        if not due or self.dead is not None or not self._remote:
            return not due
        if self._ctrl_posted - self._ctrl_done >= CTRL_SLOTS or len(self._inflight) >= SQ_DEPTH:
            return False  # retried at the next poll
        off = (RQ_DEPTH + self._ctrl_posted % CTRL_SLOTS) * SLOT
        self.ctrl64[off // 8 : off // 8 + 3] = (self._r_pos, self._polled, flags)
        if not self._post(self.v.e.IBV_WR_SEND, self.ctrl_mr.buf + off, SLOT, self.ctrl_mr.lkey, _CTRL, 0):
            return False
        self._ctrl_posted += 1
        self._sent_read, self._sent_polled = self._r_pos, self._polled
        return True

    # ------------------------------------------------------------------ Channel protocol
    def write_some(self, data: np.ndarray) -> int:
        if self.dead is not None or self._peer_closed or self._closed:
            return 0
        self._poll()
        cap, w = self.capacity, self._w_pos
        # NOTE: room is bounded by the peer's credited read position (its ring) and by our own completions
        # (the stage bytes of position p - capacity may still be read by the NIC until that write completes).
        n = min(data.nbytes, cap - (w - self._peer_read), cap - (w - self._staged))
        if (n <= 0 or self.dead is not None or self._writes - self._peer_polled + 2 > WINDOW
                or len(self._inflight) + 2 > SQ_DEPTH - CTRL_SLOTS - 1):
            return 0
        at = w % cap
        first = min(n, cap - at)
        for start, length, off in ((0, first, at), (first, n - first, 0)):
            if length:
                self.stage[off : off + length] = data[start : start + length]
                w += length
                remote = (self._remote["ring"][1], self._remote["ring"][0] + off)
                if not self._post(self.v.e.IBV_WR_RDMA_WRITE_WITH_IMM, self.stage_mr.buf + off, length,
                                  self.stage_mr.lkey, _DATA, w, remote=remote, imm=length):
                    return 0
                self._writes += 1
                self._w_pos = w
        return n

    def read_some(self, into: np.ndarray) -> int:
        if self._closed:
            return 0
        self._poll()
        n = min(self._known_w - self._r_pos, into.nbytes)
        if n <= 0:
            return 0
        cap = self.capacity
        at = self._r_pos % cap
        first = min(n, cap - at)
        into[:first] = self.ring[at : at + first]
        if n > first:
            into[first:n] = self.ring[: n - first]
        self._r_pos += n
        self._credit()
        return n

    def alive(self) -> bool:
        if self.dead is None and not self._closed:
            self._poll()
            now = time.monotonic()
            if (self.dead is None and not self._probing and now - self._last_probe > PROBE_S
                    and len(self._inflight) < SQ_DEPTH):
                self._last_probe = now  # an 8-byte RDMA write into the peer's probe sink: fails once it is gone
                remote = (self._remote["ctrl"][1], self._remote["ctrl"][0] + SINK_OFF)
                self._probing = self._post(self.v.e.IBV_WR_RDMA_WRITE, self.ctrl_mr.buf + PROBE_OFF, 8,
                                           self.ctrl_mr.lkey, _PROBE, 0, remote=remote)
        if self._known_w > self._r_pos:
            return True  # whatever it sent before it went is still ours to read
        return self.dead is None and not self._peer_closed

    def flush(self) -> None:
        pass  # the write's immediate is the doorbell

    def close(self, drain: bool = True) -> None:
        if self._closed:
            return
        if drain and self._remote:
            # NOTE: isend reports done once bytes are staged; they must leave before the QP is destroyed.
            # A dead peer ends this early (error completion after the NIC's retries).
            end = time.monotonic() + 5.0
            while self.dead is None and any(k == _DATA for k, _ in self._inflight) and time.monotonic() < end:
                self._poll()
            end = time.monotonic() + 0.02  # best effort: the close notice, unless the peer is already gone
            while self.dead is None and not self._credit(F_CLOSED) and time.monotonic() < end:
                self._poll()
            while self.dead is None and self._inflight and time.monotonic() < end:
                self._poll()
        self._closed = True
        self.ring = self.stage = self.ctrl64 = None  # drop the views before their memory goes
        for obj in (self.qp, self.cq, self.ring_mr, self.stage_mr, self.ctrl_mr):
            try:
                obj.close()
            except self.v.Error:
                pass


class RdmaEndpoint(StreamEndpoint):
    transport = "rdma"

    def __init__(self, rank, channels, ctx, pd, timeout_s):
        super().__init__(rank, channels, timeout_s)
        self._ctx, self._pd = ctx, pd

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for obj in (self._pd, self._ctx):
            try:
                obj.close()
            except Exception:  # pyverbs errors on teardown: nothing left to do about them
                pass


def _open_device(v: SimpleNamespace, name: str | None, port: int):
    try:
        names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name) for dev in v.d.get_device_list()]
    except v.Error as err:
        raise MscError(_MISSING.format(f"cannot list RDMA devices ({err})")) from None
    if not names:
        raise MscError(_MISSING.format("no RDMA device on this host"))
    if name and name not in names:
        raise MscError(f"rdma: no RDMA device named {name}; this host has {names}")
    for n in [name] if name else names:
        ctx = v.d.Context(name=n)
        try:
            if ctx.query_port(port).state == v.e.IBV_PORT_ACTIVE:
                return ctx
        except v.Error:
            pass
        ctx.close()
    raise MscError(f"rdma: port {port} is not active on {[name] if name else names}")


def _pick_gid(v: SimpleNamespace, ctx, port: int) -> int:
    """On RoCE: the best GID, a RoCE v2 one with an IPv4-mapped address if there is one."""
    roce_v2 = getattr(v.e, "IBV_GID_TYPE_SYSFS_ROCE_V2", None)
    best, best_score = None, 0
    for i in range(ctx.query_port(port).gid_tbl_len):
        try:
            gid = str(ctx.query_gid(port, i))
        except v.Error:
            continue
        if gid.endswith("0000:0000:0000:0000"):  # interface id zero: an empty slot
            continue
        score = 1 + gid.startswith("0000:0000:0000:0000:0000:ffff:")
        try:
            score += 2 * (roce_v2 is not None and ctx.query_gid_type(port, i) == roce_v2)
        except (v.Error, AttributeError):  # older pyverbs: no query_gid_type
            pass
        if score > best_score:
            best, best_score = i, score
    if best is None:
        raise MscError(f"rdma: port {port} of {ctx.name} has no usable GID (RoCE needs an IP address on its netdev)")
    return best


def _fetch(store, key: str, deadline: float, what: str) -> str:
    return fetch_key(store, key, deadline - time.monotonic(), f"rdma: {what}")


def connect_rdma(rank: int, peers: list[int], store, *, prefix: str = "m2n", timeout_s: float = DEFAULT_TIMEOUT_S,
                 capacity: int = DEFAULT_CAPACITY, device_name: str | None = None, port: int = 1,
                 gid_index: int | None = None) -> RdmaEndpoint:
    """Open the device, build one channel per peer, swap QP/ring details through `store` (JSON); return the endpoint."""
    v = _load_pyverbs()
    if capacity < 4096 or capacity % 64 or capacity >= 1 << 31:
        raise MscError(f"rdma ring capacity must be a multiple of 64 bytes in [4096, 2**31), got {capacity}")
    peers = sorted(peers)
    ctx = _open_device(v, device_name or msc_env.raw("MSC_RDMA_DEVICE"), port)
    channels: dict[int, RdmaChannel] = {}
    deadline = time.monotonic() + timeout_s
    try:
        pattr = ctx.query_port(port)
        if capacity > pattr.max_msg_sz:
            raise MscError(f"rdma ring capacity {capacity} exceeds the port's largest message ({pattr.max_msg_sz})")
        eth = pattr.link_layer == v.e.IBV_LINK_LAYER_ETHERNET
        # NOTE: InfiniBand routes by LID inside a subnet (GID 0 is published but unused unless asked for);
        # RoCE has no LIDs, so every packet carries a GRH with a GID of the NIC's IP address.
        use_grh = eth or gid_index is not None
        gid_index = gid_index if gid_index is not None else (_pick_gid(v, ctx, port) if eth else 0)
        gid = str(ctx.query_gid(port, gid_index))
        pd = v.PD(ctx)
        for p in peers:
            channels[p] = RdmaChannel(v, ctx, pd, port, p, capacity)
        mine = {}
        for p, ch in channels.items():
            mine[p] = {"qpn": ch.qp.qp_num, "psn": ch.psn, "lid": pattr.lid, "gid": gid, "mtu": pattr.active_mtu,
                       "capacity": capacity, "ring": [ch.ring_mr.buf, ch.ring_mr.rkey],
                       "ctrl": [ch.ctrl_mr.buf, ch.ctrl_mr.rkey]}
            store.set(f"{prefix}/rdma/{rank}->{p}", json.dumps(mine[p]))
        for p, ch in channels.items():
            theirs = json.loads(_fetch(store, f"{prefix}/rdma/{p}->{rank}", deadline,
                                       f"rank {p} did not publish its queue pair within {timeout_s:.0f} s"))
            if theirs["capacity"] != capacity:
                raise MscError(f"rdma: rank {p} uses {theirs['capacity']}-byte rings, rank {rank} {capacity}")
            ch.connect(mine[p], theirs, gid_index, use_grh)
        # Nobody sends before every peer's QP has reached RTR (packets to an INIT QP are dropped).
        store.set(f"{prefix}/rdma/ready/{rank}", "1")
        for p in peers:
            _fetch(store, f"{prefix}/rdma/ready/{p}", deadline,
                   f"rank {p} did not bring up its queue pairs within {timeout_s:.0f} s")
    except BaseException as err:
        for ch in channels.values():
            ch.close(drain=False)
        ctx.close()
        if isinstance(err, v.Error):
            raise MscError(f"rdma: rank {rank} could not set up its queue pairs on {ctx.name}: {err}") from None
        raise
    return RdmaEndpoint(rank, channels, ctx, pd, timeout_s)
