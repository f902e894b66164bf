"""`msc launch DIR --engine torchrun`: one bundle's roles spread over several nodes with torchrun.

Each node runs `msc launch DIR --engine torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT` with
the same job arguments (`node_commands` prints them). The roles are split over the nodes as evenly as the
count allows (node r runs `node_counts(...)[r]` of them); each node's launcher starts torchrun with that
many processes and torchrun's c10d rendezvous (hosted by node 0: `is_host`) gives them their global ranks,
which pick their roles from the bundle's manifest exactly as on one machine (msc.runtime.worker). Roles on
one node see LOCAL_WORLD_SIZE < WORLD_SIZE and connect with the tcp transport, each listening on the
address this node uses to reach the rendezvous host (MSC_M2N_HOST).

Node 0 also hosts the job store (msc.runtime.job_store): the other nodes check in there (a node that never
does is named after the join timeout), attention roles leave their results there and failing roles their
failure records, so node 0 prints the outputs of roles wherever they ran and names the role and node that
failed first. A local role silent for longer than runtime.heartbeat_timeout_s stops the node's torchrun.
Nothing outlives the launcher: torchrun runs in its own session and is killed with its process group; the
roles also watch torchrun's agent (msc.runtime.lifecycle) and remove the node's run folder.

NOTE: inside a node the roles use tcp too (auto picks shm only when every role shares the host); a mixed
shm-inside / tcp-across endpoint is future work.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from msc.bundle import Bundle, resolve_checkpoint
from msc.errors import MscError
from msc.runtime import job_store, lifecycle
from msc.runtime.launcher import SECONDARY, _tail, check_requests, heartbeat_bound_s
from msc.runtime.serving import ServingEngine
from msc.runtime.worker import resolve_run_config


@dataclass
class NodeJob:
    """What one node's `msc launch --engine torchrun` runs (every node gets the same job arguments)."""

    bundle_dir: str
    nnodes: int
    node_rank: int
    rdzv_endpoint: str  # HOST:PORT of node 0
    prompts: list[list[int]]
    max_new_tokens: int
    sampling: list[dict] | None = None
    job_port: int | None = None  # default: the rendezvous port + 1
    join_timeout_s: float = 120.0
    timeout_s: float | None = None  # the whole job; default: 4 x runtime.timeout_s
    run_options: dict = field(default_factory=dict)  # run-config overrides (random_weights, device, checkpoint ...)
    serve: bool = False  # serve requests (node 0: HTTP) instead of running the prompts

    @property
    def rdzv_host(self) -> str:
        return parse_endpoint(self.rdzv_endpoint)[0]

    @property
    def rdzv_port(self) -> int:
        return parse_endpoint(self.rdzv_endpoint)[1]


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise MscError(f"--rdzv-endpoint must be HOST:PORT (node 0's address and a free port), got {text!r}")
    return host.strip("[]"), int(port)


def node_counts(world: int, nnodes: int) -> list[int]:
    """How many roles each node runs: as even as possible, the first nodes taking one more."""
    if not 1 <= nnodes <= world:
        raise MscError(f"--nnodes must be between 1 and the bundle's {world} roles, got {nnodes}")
    return [world // nnodes + (r < world % nnodes) for r in range(nnodes)]


def node_commands(bundle_dir: str, nnodes: int, rdzv_endpoint: str, job_args: list[str]) -> list[str]:
    """The exact `msc launch` command of every node (what `--print` shows)."""
    counts = node_counts(len(Bundle.open(bundle_dir).roles), nnodes)
    base = ["msc", "launch", str(bundle_dir), "--engine", "torchrun", "--nnodes", str(nnodes)]
    return [" ".join(shlex.quote(a) for a in [*base, "--node-rank", str(r), "--rdzv-endpoint", rdzv_endpoint, *job_args])
            + f"    # node {r}: {counts[r]} role process(es)" for r in range(nnodes)]


def _local_address(host: str, port: int) -> str:
    """The address of this machine that reaches host (where this node's roles listen for their peers)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


def _rdzv_id(bundle: Bundle, endpoint: str) -> str:
    """The same on every node (the same bundle, the same endpoint), different for another job."""
    digest = hashlib.sha256(json.dumps(bundle.manifest.get("digests", {}), sort_keys=True).encode() + endpoint.encode())
    return "msc-" + digest.hexdigest()[:16]


def _check_job(bundle: Bundle, job: NodeJob) -> None:
    check_requests(bundle, job.prompts, job.max_new_tokens, job.sampling)
    if not 0 <= job.node_rank < job.nnodes:
        raise MscError(f"--node-rank must be in [0, {job.nnodes}), got {job.node_rank}")


def torchrun_command(job: NodeJob, bundle: Bundle, workdir: Path, nproc: int) -> list[str]:
    conf = f"join_timeout={max(1, int(job.join_timeout_s))},is_host={1 if job.node_rank == 0 else 0}"
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(job.nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{job.rdzv_host}:{job.rdzv_port}",
            "--rdzv-id", _rdzv_id(bundle, job.rdzv_endpoint), "--rdzv-conf", conf, "--max-restarts", "0",
            "--monitor-interval", "0.2", "-m", "msc.runtime.worker", "--bundle", str(bundle.path),
            "--requests", str(workdir / "requests.json"), "--result", str(workdir / "result.{rank}.json"),
            "--run-config", str(workdir / "run-config.json")]


def run_node(job: NodeJob) -> dict | None:
    """Run this node's share of the job; on node 0 return {"outputs", "finish_reasons", "errors", "nodes",
    "transport"} (as msc run does), elsewhere None. MscError naming the role and node that failed first."""
    bundle = Bundle.open(job.bundle_dir)
    _check_job(bundle, job)
    roles = bundle.roles
    nproc = node_counts(len(roles), job.nnodes)[job.node_rank]
    # the checkpoint as this node sees it (checked against the bundle; the bundle's own, relative to it, if none)
    given = job.run_options.get("checkpoint")
    if given is not None or not job.run_options.get("random_weights"):
        job.run_options = {**job.run_options, "checkpoint": resolve_checkpoint(bundle, given)}
    run_config = resolve_run_config(dict(job.run_options), bundle.manifest)  # bad options fail before anything starts
    job_port = job.job_port or job.rdzv_port + 1
    timeout_s = job.timeout_s or bundle.manifest["spec"]["runtime"]["timeout_s"] * 4
    if job.node_rank == 0:
        store = job_store.host(job.rdzv_host, job_port, job.join_timeout_s)
    else:
        store = job_store.connect(job.rdzv_host, job_port, job.join_timeout_s)
    store.set(f"node/{job.node_rank}", socket.gethostname())
    if job.node_rank == 0:
        _wait_for_nodes(store, job)
    if job.serve:
        return _serve_node(job, bundle, store, nproc)
    tag = lifecycle.new_run_tag()
    workdir = Path(tempfile.mkdtemp(prefix="msc-launch-"))
    proc = None
    try:
        (workdir / "requests.json").write_text(json.dumps({"prompts": job.prompts, "max_new_tokens": job.max_new_tokens,
                                                           "sampling": job.sampling}))
        proc = _start_torchrun(job, bundle, workdir, tag, nproc, job.run_options)
        rc = _watch(proc, job, bundle, workdir, time.monotonic() + timeout_s + job.join_timeout_s)
        if rc != 0:
            _report_abrupt_exits(store, job, roles, workdir)
            raise MscError(_failure(store, job, roles, workdir, rc))
        if job.node_rank != 0:
            return None
        return _gather(store, job, bundle, run_config)
    finally:
        if proc is not None:
            _stop_group(proc)
        lifecycle.cleanup_run(workdir, tag)


def _start_torchrun(job: NodeJob, bundle: Bundle, workdir: Path, tag: str, nproc: int, run_config: dict) -> subprocess.Popen:
    """This node's torchrun (in a session of its own) on msc.runtime.worker with `run_config`."""
    (workdir / "run-config.json").write_text(json.dumps({k: v for k, v in run_config.items() if v is not None}))
    inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = {**inherited, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           job_store.STORE_ENV: f"{job.rdzv_host}:{job.job_port or job.rdzv_port + 1}", job_store.NODE_ENV: str(job.node_rank),
           "MSC_M2N_HOST": os.environ.get("MSC_M2N_HOST") or _local_address(job.rdzv_host, job.rdzv_port),
           lifecycle.PARENT_ENV: lifecycle.PARENT_ANY, lifecycle.RUN_DIR_ENV: str(workdir), lifecycle.RUN_TAG_ENV: tag}
    with open(workdir / "torchrun.log", "w") as log:
        return subprocess.Popen(torchrun_command(job, bundle, workdir, nproc), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


# ------------------------------------------------------------------------------------------ --serve
class NodeServingEngine(ServingEngine):
    """Node 0's serving engine under `msc launch --serve`: the replicas run under torchrun on every node and
    connect back to this process (the link server listens on the rendezvous host; its address and token go
    to the other nodes through the job store). NOTE: no restarts: a role that dies anywhere ends the
    deployment (restarting means a new rendezvous of every node)."""

    def __init__(self, job: NodeJob, store, nproc: int):
        opts = job.run_options
        super().__init__(job.bundle_dir, random_weights=bool(opts.get("random_weights")), device=opts.get("device"),
                         checkpoint=opts.get("checkpoint"), max_restarts=0)
        self.job, self.store, self.nproc = job, store, nproc
        self.link_host = job.rdzv_host
        self._torchrun: subprocess.Popen | None = None

    def _start_roles(self, cfg: dict) -> None:
        self.store.set("serve/link", json.dumps(cfg["serve"]))
        self._torchrun = _start_torchrun(self.job, self.bundle, self._workdir, self._tag, self.nproc, cfg)

    def _stop_roles(self, grace_s: float) -> None:
        if self._torchrun is None:
            return
        try:
            self._torchrun.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _stop_group(self._torchrun)

    def _raise_if_a_role_failed(self) -> None:
        if self._closing or self._torchrun is None or self._workdir is None:
            return
        rc = self._torchrun.poll()
        if rc is not None:
            _report_abrupt_exits(self.store, self.job, self.bundle.roles, self._workdir)
            raise MscError(_failure(self.store, self.job, self.bundle.roles, self._workdir, rc))
        silent = lifecycle.silence_message(self._workdir, self.bundle.roles, self.heartbeat_s, " on node 0")
        if silent:
            raise MscError(silent)


def _serve_node(job: NodeJob, bundle: Bundle, store, nproc: int) -> "NodeServingEngine | None":
    """--serve: node 0 returns its started serving engine (the caller serves HTTP on it, then closes it);
    another node runs its roles until node 0 stops them, then returns None."""
    if job.node_rank == 0:
        engine = NodeServingEngine(job, store, nproc)
        return engine.start(timeout_s=job.join_timeout_s + bundle.manifest["spec"]["runtime"]["timeout_s"] * 4)
    deadline = time.monotonic() + job.join_timeout_s * 2
    while (link := job_store.get(store, "serve/link")) is None:
        if time.monotonic() > deadline:
            raise MscError("node 0 did not start serving (no serving address in its job store)")
        time.sleep(0.1)
    tag = lifecycle.new_run_tag()
    workdir = Path(tempfile.mkdtemp(prefix="msc-launch-"))
    proc = None
    try:
        proc = _start_torchrun(job, bundle, workdir, tag, nproc, {**job.run_options, "serve": json.loads(link)})
        rc = _watch(proc, job, bundle, workdir, None)  # serves until node 0 stops the replicas
        if rc != 0:
            _report_abrupt_exits(store, job, bundle.roles, workdir)
            raise MscError(_failure(store, job, bundle.roles, workdir, rc))
        return None
    finally:
        if proc is not None:
            _stop_group(proc)
        lifecycle.cleanup_run(workdir, tag)


def _wait_for_nodes(store, job: NodeJob) -> None:
    deadline = time.monotonic() + job.join_timeout_s
    while True:
        missing = [r for r in range(job.nnodes) if not store.check([f"node/{r}"])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise MscError(f"node rank(s) {missing} did not join the rendezvous at {job.rdzv_endpoint} within "
                           f"{job.join_timeout_s:.0f} s (start `msc launch ... --node-rank R` on every node; "
                           "`--print` shows the commands)")
        time.sleep(0.1)


def _watch(proc: subprocess.Popen, job: NodeJob, bundle: Bundle, workdir: Path, deadline: float | None) -> int:
    """torchrun's exit code; MscError when a local role is silent past its heartbeat bound or time runs out."""
    bound = heartbeat_bound_s(bundle.manifest)
    while True:
        try:
            return proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        silent = lifecycle.silence_message(workdir, bundle.roles, bound, f" on node {job.node_rank}")
        if silent:
            raise MscError(silent)
        if deadline is not None and time.monotonic() > deadline:
            raise MscError(f"node {job.node_rank}: the job did not end within its time bound")


def _report_abrupt_exits(store, job: NodeJob, roles: list[dict], workdir: Path) -> None:
    """Record the local roles that died without a word (killed, os._exit) in the job store. NOTE: a role
    removes its heartbeat file on every way out of its main function, so a file left behind after torchrun
    ended marks one that never got there; its last beat dates the death."""
    for r in roles:
        beat = workdir / f"heartbeat.{r['rank']}"
        try:
            when = beat.stat().st_mtime
        except FileNotFoundError:
            continue
        key = f"failure/{r['rank']}"
        try:
            if job_store.get(store, key) is None:
                store.set(key, json.dumps({"kind": "own", "node": str(job.node_rank), "time": when,
                                           "error": f"the process ended abruptly (killed, or exited without "
                                                    f"cleaning up); its output is in node {job.node_rank}'s torchrun log"}))
        except RuntimeError:  # node 0's store is gone
            return


def _failure(store, job: NodeJob, roles: list[dict], workdir: Path, rc: int) -> str:
    """The failure to report: the role that failed on its own first (from the job store, wherever it ran),
    else torchrun's own last words."""
    records = {}
    deadline = time.monotonic() + 3.0  # NOTE: the other nodes' roles report a moment after they fail
    while time.monotonic() < deadline:
        try:
            records = {r["rank"]: json.loads(v) for r in roles
                       if (v := job_store.get(store, f"failure/{r['rank']}")) is not None}
        except (RuntimeError, ValueError):  # node 0's store is gone (this is another node)
            break
        if any(rec.get("kind") not in SECONDARY for rec in records.values()):
            break
        time.sleep(0.1)
    if records:
        rank, rec = min(records.items(), key=lambda kv: (kv[1].get("kind") in SECONDARY, kv[1].get("time", 0.0)))
        role = next(r for r in roles if r["rank"] == rank)
        return f"role {role['name']} (rank {rank}) on node {rec.get('node')} failed: {rec.get('error')}"
    return f"node {job.node_rank}: torchrun exited with code {rc}: {_tail(workdir / 'torchrun.log', 4)}"


def _gather(store, job: NodeJob, bundle: Bundle, run_config: dict) -> dict:
    """Node 0: every attention role's result from the job store, merged in prompt order."""
    ranks = [r["rank"] for r in bundle.roles if r["kind"] == "attention"]
    deadline = time.monotonic() + 30.0
    results = {}
    while len(results) < len(ranks):
        for rank in ranks:
            if rank not in results and (v := job_store.get(store, f"result/{rank}")) is not None:
                results[rank] = json.loads(v)
        if len(results) < len(ranks):
            if time.monotonic() > deadline:
                missing = sorted(set(ranks) - set(results))
                raise MscError(f"the attention roles of rank(s) {missing} ended without a result")
            time.sleep(0.1)
    n = len(job.prompts)
    outputs, reasons, errors = [None] * n, [None] * n, [None] * n
    transport = None
    for res in results.values():
        transport = res.get("transport")
        for i, out, why, err in zip(res["indices"], res["outputs"], res["finish_reasons"], res["errors"]):
            outputs[i], reasons[i], errors[i] = out, why, err
    return {"outputs": outputs, "finish_reasons": reasons, "errors": errors, "transport": transport,
            "nodes": job.nnodes, "microbatches": run_config["microbatches"]}


def _stop_group(proc: subprocess.Popen) -> None:
    """End torchrun and everything it started (its session's process group): TERM, then KILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the group may outlive its leader for a moment: make sure nothing of it is left
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
