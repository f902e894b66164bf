"""The job store of a deployment launched across nodes (`msc launch --engine torchrun`).

torchrun's rendezvous pairs the role processes; it does not tell node 0's launcher what the roles on
other nodes produced or why they failed. So node 0's `msc launch` hosts a small TCPStore of its own (the
*job store*, on the rendezvous host at the rendezvous port + 1 unless told otherwise) and:

- every node's launcher checks in (`node/R`), so that node 0 can name a node that never joined;
- every attention role puts its result (`result/RANK`) and every failing role its failure record
  (`failure/RANK`: role error, kind "own" or "peer", time, node) there; node 0 reads them back.

Role processes find it through MSC_JOB_STORE=HOST:PORT and their node through MSC_NODE_RANK; outside
`msc launch` (msc run, msc serve, bare torchrun) the variables are unset and `report` does nothing.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from msc.errors import MscError

STORE_ENV = "MSC_JOB_STORE"
NODE_ENV = "MSC_NODE_RANK"
_client: dist.TCPStore | None = None
_keep: list = []  # listening sockets handed to hosted stores (they serve for the life of the process)


def host(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """Host the job store on addr:port (node 0). NOTE: a socket bound to the rendezvous address, not to every
    interface (torch's default), is handed to the store."""
    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
    except OSError as e:
        raise MscError(f"node 0 cannot host the job store on {addr}:{port}: {e} (is {addr} an address of this "
                       "machine? the rendezvous endpoint must name node 0)") from None
    sock.listen(256)
    _keep.append(sock)
    return dist.TCPStore(addr, port, None, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=sock.fileno())


def connect(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the job store (another node's launcher, or a role process); MscError after timeout_s."""
    try:
        return dist.TCPStore(addr, port, None, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, TimeoutError) as e:
        raise MscError(f"no job store at {addr}:{port} within {timeout_s:.0f} s (is node 0's msc launch running?): "
                       f"{str(e).splitlines()[0]}") from None


def get(store: dist.TCPStore, key: str) -> str | None:
    """The value of key, or None when it is not set (never waits)."""
    if not store.check([key]):
        return None
    return store.get(key).decode()


def report(key: str, value: str) -> None:
    """In a role process: set key on the job store named by MSC_JOB_STORE (no-op outside msc launch). A
    role reports on its way out, so a store that cannot be reached is skipped, not raised."""
    global _client
    where = os.environ.get(STORE_ENV)
    if not where:
        return
    try:
        if _client is None:
            addr, _, port = where.rpartition(":")
            _client = connect(addr, int(port), 10.0)
        _client.set(key, value)
    except (MscError, RuntimeError, ValueError):
        pass
