"""`msc launch DIR --engine ray`: run a bundle's roles as Ray actors placed on the pools its plan names.

Ray is an optional extra (`pip install "msc[ray]"`); nothing here imports it until a launch starts.

Placement: one placement-group bundle per role, carrying that role's resources (`side_resources`):

- a heterogeneous plan (the spec's `hardware.attention` and `hardware.experts` pools) puts attention roles on
  the attention pool's GPU type and expert roles on the experts pool's; `hardware.pool` puts both on one type;
- on a GPU run a role needs `{"GPU": 1, "accelerator_type:<GPU>": 0.001}` (the resource Ray gives every
  node that carries that GPU type; `ray_accelerator_type` maps msc's catalogue names to Ray's);
- on a CPU run `{"CPU": 1, "msc_pool_<GPU>": 1}`: a custom resource that the pool's nodes are started with
  (`ray start --resources '{"msc_pool_L40S": 8}'`), so that CPU machines (and tests) stand for GPU types;
- with no hardware section: `{"GPU": 1}` or `{"CPU": 1}`;
- `resources={"attention": {...}, "expert": {...}}` replaces either side's mapping.

Each role runs as a child process (`python -P -m msc.runtime.worker`) of its actor; the rank-0 actor's
node IP and a free port there are the rendezvous (MASTER_ADDR/PORT), LOCAL_WORLD_SIZE counts the roles on
a role's node, so the M2N transport `auto` picks shm when every role landed on one node and tcp when they
span nodes (m2n.connect opens one transport for the whole deployment: it never mixes shm and tcp), and
MSC_M2N_HOST is the role's node IP. On GPU runs every role counts as alone on its node (see
_Deployment.start): `auto` picks torch_dist (NCCL).

Failure story: an actor that dies or a role process that fails stops the deployment with one message
naming the role, its rank and the Ray node (id and IP); every actor is then stopped (its role process
killed and reaped, its folder and shared-memory files removed) and killed, the placement group removed,
and a Ray instance started here shut down. A role process whose actor is killed ends by itself
(msc.runtime.lifecycle.watch_parent: MSC_PARENT_PID is the actor's pid); a launcher killed outright loses
its actors too (Ray ends the actors a dead driver owned), and so their role processes. Every wait is bounded.

The CLI (`msc launch DIR --engine ray`) is expected to take:
  --address ADDR             join a cluster ("auto", "ray://HOST:PORT" or "HOST:PORT"); none: start a local one
  --resources attention=JSON,expert=JSON   override the Ray resources of either side's roles
  --placement-timeout S      how long the placement group may take to be placed (default 60)
  --strategy PACK|SPREAD     the placement group's strategy (default PACK)
  --checkpoint PATH, --input-ids ..., --max-new-tokens N, --json, --timeout S, --random-weights, --device
and pass them to `run_bundle_on_ray` (`parse_resources` reads the --resources text).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from msc.bundle import Bundle
from msc.errors import MscError
from msc.runtime import lifecycle
from msc.runtime.launcher import SECONDARY, check_requests, heartbeat_bound_s
from msc.runtime.worker import resolve_run_config

SIDES = ("attention", "expert")
DEFAULT_PLACEMENT_TIMEOUT_S = 60.0
ACTOR_CALL_TIMEOUT_S = 60.0  # an actor's first answer includes starting its Ray worker process
POLL_EVERY_S = 0.1
SETTLE_S = 2.0


def _ray():
    try:
        import ray
    except ImportError:
        raise MscError('the ray engine needs Ray: pip install "msc[ray]" (ray >= 2.9)') from None
    return ray


# ------------------------------------------------------------------------------------------- resources
def side_of(role: dict) -> str:
    """'attention' or 'expert': which pool a role (attention, attention_tp, expert, expert_tp) runs on."""
    return "expert" if role["kind"].startswith("expert") else "attention"


def pool_gpus(manifest: dict) -> dict[str, str | None]:
    """{"attention": GPU type or None, "expert": ...} from the spec's hardware section."""
    hw = manifest["spec"].get("hardware") or {}
    shared = (hw.get("pool") or {}).get("gpu")
    return {"attention": (hw.get("attention") or {}).get("gpu") or shared,
            "expert": (hw.get("experts") or {}).get("gpu") or shared}


def pool_resource(gpu: str) -> str:
    """The custom resource that stands for GPU type `gpu` on a CPU run: msc_pool_<gpu>."""
    return f"msc_pool_{gpu}"


# NOTE: msc's GPU catalogue (msc/planner/gpus.yaml) names some types more precisely than the accelerator_type
# Ray detects on a node; these are the ones that differ (the rest, H20, H200, L40S, ..., are spelt alike).
# A type Ray names otherwise is reached with `resources=` (--resources).
RAY_ACCELERATOR_TYPE = {"H100-SXM": "H100", "A100-80GB": "A100-80G"}


def ray_accelerator_type(gpu: str) -> str:
    """The accelerator_type Ray gives a node of msc GPU type `gpu`."""
    return RAY_ACCELERATOR_TYPE.get(gpu, gpu)


def side_resources(manifest: dict, device: str, overrides: dict[str, dict] | None = None) -> dict[str, dict[str, float]]:
    """The Ray resources one role of each side needs (see the module docstring); `overrides` replaces a side's."""
    overrides = overrides or {}
    unknown = set(overrides) - set(SIDES)
    if unknown:
        raise MscError(f"resources: unknown side(s) {sorted(unknown)}; expected attention and/or expert")
    out = {}
    for side, gpu in pool_gpus(manifest).items():
        if side in overrides:
            res = overrides[side]
            if not isinstance(res, dict) or not res or any(
                    not isinstance(k, str) or not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0
                    for k, v in res.items()):
                raise MscError(f"resources for {side}: expected a non-empty object of resource name -> amount >= 0, got {res!r}")
            out[side] = {k: float(v) for k, v in res.items()}
        elif device == "cuda":
            out[side] = {"GPU": 1.0, **({f"accelerator_type:{ray_accelerator_type(gpu)}": 0.001} if gpu else {})}
        else:
            out[side] = {"CPU": 1.0, **({pool_resource(gpu): 1.0} if gpu else {})}
    return out


def parse_resources(text: str) -> dict[str, dict]:
    """Read `attention=JSON,expert=JSON` (either part optional) as given to --resources."""
    out: dict[str, dict] = {}
    rest = text.strip()
    while rest:
        side, eq, rest = rest.partition("=")
        side = side.strip().lstrip(",").strip()
        if not eq or side not in SIDES:
            raise MscError(f"--resources: expected attention=JSON,expert=JSON, got {text!r}")
        try:  # NOTE: the JSON object itself holds commas, so it is read with raw_decode up to its end
            value, end = json.JSONDecoder().raw_decode(rest.lstrip())
        except ValueError as e:
            raise MscError(f"--resources: the value for {side} is not JSON ({e})") from None
        rest = rest.lstrip()[end:].strip()
        if rest and not rest.startswith(","):
            raise MscError(f"--resources: expected a comma after the value for {side}, got {rest!r}")
        out[side] = value
    return out


def placement_bundles(roles: list[dict], per_side: dict[str, dict[str, float]]) -> list[dict[str, float]]:
    """One placement-group bundle per role, in rank order."""
    return [dict(per_side[side_of(r)]) for r in roles]


def missing_resources(bundles: list[dict[str, float]], roles: list[dict], nodes: list[dict]) -> list[str]:
    """What the cluster (ray.nodes(): alive nodes with their Resources) lacks to place `bundles`: for each
    resource the plan's total against the cluster's, and for each bundle whether some node can hold it."""
    alive = [n for n in nodes if n.get("Alive", True)]
    total: dict[str, float] = {}
    for n in alive:
        for k, v in n.get("Resources", {}).items():
            total[k] = total.get(k, 0.0) + v
    problems = []
    need: dict[str, list[tuple[dict, float]]] = {}
    for r, b in zip(roles, bundles):
        for k, v in b.items():
            need.setdefault(k, []).append((r, v))
    for k, users in need.items():
        want = sum(v for _, v in users)
        if total.get(k, 0.0) + 1e-9 < want:
            amounts = sorted({v for _, v in users})
            each = f"{amounts[0]:g} each" if len(amounts) == 1 else "amounts " + "/".join(f"{a:g}" for a in amounts)
            problems.append(f"the plan needs {len(users)} role(s) with {k} ({each}, {want:g} in all) "
                            f"but the cluster has {total.get(k, 0.0):g} of it")
    if not problems:
        for r, b in zip(roles, bundles):
            if not any(all(n.get("Resources", {}).get(k, 0.0) + 1e-9 >= v for k, v in b.items()) for n in alive):
                problems.append(f"role {r['name']} needs {_fmt(b)} on one node but no node has that much")
    return problems


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def describe_nodes(nodes: list[dict]) -> str:
    """`IP (node abc123): {CPU: 2, msc_pool_L40S: 2}; ...` for the alive nodes (Ray's own node:... keys left out)."""
    parts = []
    for n in nodes:
        if not n.get("Alive", True):
            continue
        res = {k: v for k, v in n.get("Resources", {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        parts.append(f"{n.get('NodeManagerAddress')} (node {str(n.get('NodeID'))[:8]}): {_fmt(res)}")
    return "; ".join(parts) or "none alive"


# ------------------------------------------------------------------------------------------- the actor
class RoleActor:
    """Runs one role of a deployment on its Ray node, as a child process of this actor.

    NOTE: a child process rather than run_worker inside the actor: a role that crashes, is killed or leaves
    through os._exit (the fault hooks, watch_parent) ends only its process, which the actor sees and reports
    with its exit status and log, where the same inside the actor would kill the actor with no account of
    why; the role gets a clean process (its own log, signal handlers, faulthandler) as under `msc run`; and
    the role watches this actor's pid (MSC_PARENT_PID), so a killed actor takes its role with it."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="msc-ray-"))
        self.proc: subprocess.Popen | None = None
        self.tag = ""
        self.rank = 0
        self.name = ""

    def node(self) -> dict:
        """Where this actor runs: Ray node id, node IP, pid and a free TCP port on that IP (for rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ip, "pid": os.getpid(), "port": port}

    def start(self, bundle_dir: str, role: dict, env: dict[str, str], requests: str, run_config: str) -> int:
        """Start the role's process (env: the deployment's variables for it); its pid."""
        self.rank, self.name = role["rank"], role["name"]
        self.tag = env.get(lifecycle.RUN_TAG_ENV, "")
        (self.workdir / "requests.json").write_text(requests)
        (self.workdir / "run-config.json").write_text(run_config)
        # NOTE: see msc.runtime.launcher.spawn_roles: Triton's interpreter is not for role processes
        inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        full_env = {**inherited, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env,
                    lifecycle.PARENT_ENV: str(os.getpid()), lifecycle.RUN_DIR_ENV: str(self.workdir)}
        cmd = [sys.executable, "-P", "-m", "msc.runtime.worker", "--bundle", bundle_dir,
               "--requests", str(self.workdir / "requests.json"), "--result", str(self.workdir / "result.{rank}.json"),
               "--run-config", str(self.workdir / "run-config.json")]
        with open(self.workdir / "role.log", "w") as log:
            self.proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=str(self.workdir))
        return self.proc.pid

    def poll(self) -> dict:
        """The role's state: returncode (None while it runs), seconds since its heartbeat, and once it has
        failed, what it wrote about the failure and the end of its log."""
        rc = None if self.proc is None else self.proc.poll()
        try:
            age = time.time() - (self.workdir / f"heartbeat.{self.rank}").stat().st_mtime
        except OSError:
            age = None
        out: dict[str, Any] = {"returncode": rc, "heartbeat_age": age}
        if rc not in (None, 0):
            try:
                out["failure"] = json.loads((self.workdir / f"failure.{self.rank}.json").read_text())
            except (OSError, ValueError):
                out["failure"] = {}
            try:
                lines = [l for l in (self.workdir / "role.log").read_text(errors="replace").splitlines() if l.strip()]
            except OSError:
                lines = []
            out["log_tail"] = " | ".join(lines[-3:])
        return out

    def result(self) -> dict | None:
        """The result file an attention replica wrote (None for other roles)."""
        try:
            return json.loads((self.workdir / f"result.{self.rank}.json").read_text())
        except (OSError, ValueError):
            return None

    def stop(self, grace_s: float = 0.0) -> None:
        """Kill the role process if it still runs (after up to grace_s), reap it, remove the actor's folder
        and the run's shared-memory files on this node."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        lifecycle.cleanup_run(self.workdir, self.tag)


# ------------------------------------------------------------------------------------------- the driver
def _where(role: dict, info: dict | None) -> str:
    node = f"Ray node {info['node_id'][:12]} ({info['ip']})" if info else "an unplaced Ray actor"
    return f"role {role['name']} (rank {role['rank']}) on {node}"


class _Deployment:
    """The Ray side of one launch: placement group, actors and where each landed; `close` undoes it all."""

    def __init__(self, ray, roles: list[dict]):
        self.ray, self.roles = ray, roles
        self.pg = None
        self.actors: list = []
        self.info: list[dict | None] = [None] * len(roles)

    def place(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray
        self.pg = placement_group(bundles, strategy=strategy, name=f"msc-{secrets.token_hex(4)}")
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            wanted = "; ".join(f"{r['name']}: {_fmt(b)}" for r, b in zip(self.roles, bundles))
            raise MscError(f"Ray could not place the deployment within {timeout_s:g} s (strategy {strategy}); "
                           f"it needs {wanted}; nodes: {describe_nodes(ray.nodes())}")
        remote = ray.remote(RoleActor)
        for i, b in enumerate(bundles):
            opts = {"num_cpus": b.get("CPU", 0.0), "num_gpus": b.get("GPU", 0.0),
                    "resources": {k: v for k, v in b.items() if k not in ("CPU", "GPU")},
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                    "max_restarts": 0, "name": f"{self.pg.id.hex()[:12]}-{self.roles[i]['name']}"}
            self.actors.append(remote.options(**opts).remote())
        calls = [a.node.remote() for a in self.actors]
        infos = self._get_all(calls, ACTOR_CALL_TIMEOUT_S, "start")
        self.info = list(infos)

    def _get_all(self, refs: list, timeout_s: float, what: str) -> list:
        """ray.get every ref (one per role) within timeout_s; MscError naming the first role that failed or
        did not answer."""
        ray = self.ray
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for i, ref in enumerate(refs):
            if ref in pending:
                raise MscError(f"{_where(self.roles[i], self.info[i])} did not {what} within {timeout_s:g} s")
            try:
                out.append(ray.get(ref, timeout=1))
            except ray.exceptions.RayActorError as e:
                raise MscError(f"{_where(self.roles[i], self.info[i])}: its actor died ({_first_line(e)})") from None
            except ray.exceptions.RayError as e:
                raise MscError(f"{_where(self.roles[i], self.info[i])} failed to {what}: {_first_line(e)}") from None
        return out

    def start(self, bundle_dir: str, env: dict[str, str], requests: str, run_config: str, tag: str,
              device: str) -> list[int]:
        """Start every role process, with the rendezvous on the rank-0 actor's node; their pids."""
        head = self.info[0]
        per_node: dict[str, list[int]] = {}
        for i, inf in enumerate(self.info):
            # NOTE: on a GPU run Ray gives each actor (and so its role process) only its own GPU through
            # CUDA_VISIBLE_DEVICES; cuda_ipc between such processes cannot open each other's memory, so every
            # role counts as alone on its node: `auto` then picks torch_dist (NCCL), which works within and
            # across nodes, and each role takes its one visible GPU (LOCAL_RANK 0).
            per_node.setdefault(inf["node_id"] if device != "cuda" else f"role-{i}", []).append(i)
        refs = []
        for i, (role, inf) in enumerate(zip(self.roles, self.info)):
            mates = next(m for m in per_node.values() if i in m)
            role_env = {**env, "MASTER_ADDR": head["ip"], "MASTER_PORT": str(head["port"]),
                        "WORLD_SIZE": str(len(self.roles)), "RANK": str(role["rank"]),
                        "LOCAL_WORLD_SIZE": str(len(mates)), "LOCAL_RANK": str(mates.index(i)),
                        "MSC_M2N_HOST": inf["ip"], lifecycle.RUN_TAG_ENV: tag}
            refs.append(self.actors[i].start.remote(bundle_dir, role, role_env, requests, run_config))
        return self._get_all(refs, ACTOR_CALL_TIMEOUT_S, "start its role process")

    def poll(self) -> list[dict]:
        """Every role's state (RoleActor.poll), {"dead": message} for an actor that died or did not answer."""
        ray = self.ray
        refs = [a.poll.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=ACTOR_CALL_TIMEOUT_S)
        states = []
        for ref in refs:
            if ref not in ready:
                states.append({"dead": f"its actor did not answer for {ACTOR_CALL_TIMEOUT_S:g} s"})
                continue
            try:
                states.append(ray.get(ref, timeout=1))
            except ray.exceptions.RayError as e:
                states.append({"dead": f"its actor died ({_first_line(e)})"})
        return states

    def close(self) -> None:
        """Stop every role process (through its actor), kill the actors, remove the placement group."""
        ray = self.ray
        stops = []
        for a in self.actors:
            try:
                stops.append(a.stop.remote())
            except Exception:  # noqa: BLE001 - a dead actor: nothing to stop there
                pass
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=20)
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.pg is not None:
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001 - removed with its cluster
                pass


def _first_line(e: BaseException) -> str:
    """Ray's error text on one line; of an actor's death only the cause ("The actor is dead because ...")."""
    text = " ".join(str(e).split())
    cause = text.find("The actor is dead because")
    if cause >= 0:
        text = text[cause:]
    return text[:300] if text else type(e).__name__


def failure_message(dep: _Deployment, states: list[dict], settle_s: float = SETTLE_S) -> str | None:
    """The message naming the role that failed first, or None if every role runs or ended well.

    NOTE: as in msc.runtime.launcher.failure_message, peers of a failed role fail soon after with "peer ...
    died"; so a dead actor is named first (nothing but Ray kills an actor), then a role that failed on its
    own (earliest), and only then one that lost a peer; a failure seen first waits up to settle_s for the
    others to report theirs."""
    def failed(ss):
        return [i for i, s in enumerate(ss) if "dead" in s or s.get("returncode") not in (None, 0)]

    if not failed(states):
        return None
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if any("dead" in s or (s.get("returncode") not in (None, 0) and s.get("failure", {}).get("kind") not in SECONDARY)
               for s in states):
            break
        if all(s.get("returncode") is not None or "dead" in s for s in states):
            break
        time.sleep(POLL_EVERY_S)
        states = dep.poll()

    def key(i):
        s = states[i]
        f = s.get("failure", {})
        return ("dead" not in s, f.get("kind") in SECONDARY, f.get("time", float("inf")))

    i = min(failed(states), key=key)
    s, role, info = states[i], dep.roles[i], dep.info[i]
    if "dead" in s:
        return f"{_where(role, info)}: {s['dead']}"
    cause = s.get("failure", {}).get("error") or s.get("log_tail") or "its log is empty"
    return f"{_where(role, info)} {lifecycle.describe_exit(s['returncode'])}: {cause}"


def _watch(dep: _Deployment, deadline: float, heartbeat_s: float) -> None:
    """Wait until every role process has ended well; MscError naming the culprit otherwise."""
    while True:
        states = dep.poll()
        msg = failure_message(dep, states)
        if msg is not None:
            raise MscError(msg)
        running = [i for i, s in enumerate(states) if s.get("returncode") is None]
        if not running:
            return
        silent = [i for i in running if (states[i].get("heartbeat_age") or 0.0) > heartbeat_s]
        if silent:
            i = silent[0]
            raise MscError(f"{_where(dep.roles[i], dep.info[i])} has not answered for {states[i]['heartbeat_age']:.1f} s "
                           f"(more than runtime.heartbeat_timeout_s = {heartbeat_s:g}): it is stopped or hung")
        if time.monotonic() > deadline:
            raise MscError(f"run timed out; still running: {', '.join(dep.roles[i]['name'] for i in running)}")
        time.sleep(POLL_EVERY_S)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """MscError unless something accepts TCP connections at the HOST:PORT of `address` (HOST:PORT or
    ray://HOST:PORT). NOTE: ray.init keeps retrying an address where no cluster runs for minutes; this
    bounds that case to timeout_s."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise MscError(f"Ray address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise MscError(f"no Ray cluster answers at {address} ({e}); start one there (ray start --head) "
                       "or give the address of a running one") from None


def _connect(ray, address: str | None, local_resources: dict[str, float], num_cpus: int) -> bool:
    """Connect this process to Ray; True when this call started or joined it (and must shut it down).

    NOTE: a process already connected (ray.init by the caller) keeps its connection, whatever `address`
    says, and it is left as found. With no address a fresh local instance is started ("local", never a
    RAY_ADDRESS from the environment), carrying the custom resources the plan asks for: one machine stands
    for every pool."""
    if ray.is_initialized():
        return False
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
              "configure_logging": True}
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, resources=local_resources or None, **common)
        else:
            ray.init(address=address, **common)
    except Exception as e:  # noqa: BLE001 - Ray's own errors name the address problem
        raise MscError(f"could not {'start a local Ray instance' if address is None else f'join the Ray cluster at {address}'}: "
                       f"{_first_line(e)}") from None
    return True


def run_bundle_on_ray(
    bundle_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    *,
    address: str | None = None,
    checkpoint: str | Path | None = None,
    timeout_s: float | None = None,
    sampling: list[dict] | None = None,
    resources: dict[str, dict] | None = None,
    random_weights: bool = False,
    device: str | None = None,
    env: dict[str, str] | None = None,
    strategy: str = "PACK",
    placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    on_start: Callable[[list[dict]], None] | None = None,
) -> dict:
    """Generate for `prompts` with the bundle's roles running as Ray actors (see the module docstring).

    address: None starts a local Ray instance (shut down at the end); "auto", "ray://HOST:PORT" or
    "HOST:PORT" joins a cluster (left running). The bundle folder (and `checkpoint`) must be at the same
    path on every node (a shared file system) and msc installed there. resources: {"attention": {...},
    "expert": {...}} replaces a side's Ray resources. strategy: the placement group's (NOTE: PACK by default,
    so roles share nodes where the pools allow and talk over shared memory; SPREAD puts them apart).
    env: extra variables for every role process. on_start: called once every role process runs, with one
    {"role", "rank", "kind", "node_id", "ip", "pid", "actor"} per role (tests and tools; `actor` is the Ray
    handle). Returns run_bundle's result shape ("outputs", "finish_reasons", "errors", "transport",
    "microbatches", "step_times", "decode_times", "records") plus "placement": per role its name, rank,
    Ray node id and IP.
    """
    bundle = Bundle.open(bundle_dir)
    check_requests(bundle, prompts, max_new_tokens, sampling)
    if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise MscError(f"placement strategy {strategy!r}: expected PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    run_config: dict[str, Any] = {"random_weights": random_weights, "device": device,
                                  "checkpoint": None if checkpoint is None else str(checkpoint)}
    cfg = resolve_run_config(run_config, bundle.manifest)  # bad overrides fail here, before Ray starts
    if not random_weights:  # a missing or mismatching checkpoint too (checked here: every node reads the same path)
        from msc.bundle import resolve_checkpoint

        run_config["checkpoint"] = resolve_checkpoint(bundle, checkpoint)
    roles = bundle.roles
    bundles = placement_bundles(roles, side_resources(bundle.manifest, cfg["device"], resources))
    ray = _ray()
    local_custom: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            if k not in ("CPU", "GPU") and not k.startswith("accelerator_type:"):
                local_custom[k] = local_custom.get(k, 0.0) + v
    cpus = int(sum(b.get("CPU", 0.0) for b in bundles) + 0.999) or 1
    owns = _connect(ray, address, local_custom, cpus)
    deadline = time.monotonic() + (timeout_s or bundle.manifest["spec"]["runtime"]["timeout_s"] * 4)
    dep = _Deployment(ray, roles)
    try:
        missing = missing_resources(bundles, roles, ray.nodes())
        if missing:
            raise MscError(f"the Ray cluster lacks what the plan needs: {'; '.join(missing)}; "
                           f"nodes: {describe_nodes(ray.nodes())}")
        dep.place(bundles, strategy, placement_timeout_s)
        requests = json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens, "dump_logits": False,
                               "sampling": sampling, "arrivals": None})
        tag = lifecycle.new_run_tag()
        pids = dep.start(str(bundle.path), dict(env or {}), requests, json.dumps(run_config), tag, cfg["device"])
        if on_start is not None:
            on_start([{"role": r["name"], "rank": r["rank"], "kind": r["kind"], "node_id": inf["node_id"],
                       "ip": inf["ip"], "pid": pid, "actor": a}
                      for r, inf, pid, a in zip(roles, dep.info, pids, dep.actors)])
        _watch(dep, deadline, heartbeat_bound_s(bundle.manifest))
        att = [i for i, r in enumerate(roles) if r["kind"] == "attention"]
        results = dep._get_all([dep.actors[i].result.remote() for i in att], ACTOR_CALL_TIMEOUT_S, "return its result")
        placement = [{"role": r["name"], "rank": r["rank"], "node_id": inf["node_id"], "ip": inf["ip"]}
                     for r, inf in zip(roles, dep.info)]
    finally:
        dep.close()
        if owns:
            ray.shutdown()
    return _merge(roles, att, results, len(prompts), placement)


def _merge(roles: list[dict], att: list[int], results: list[dict | None], n: int, placement: list[dict]) -> dict:
    """run_bundle's result dict from the attention replicas' result files."""
    outputs: list = [None] * n
    reasons: list = [None] * n
    errors: list = [None] * n
    transport, used_m, step_times, decode_times, records = None, None, [], [], []
    for i, res in zip(att, results):
        if res is None:
            raise MscError(f"role {roles[i]['name']} (rank {roles[i]['rank']}) ended without writing its result")
        transport, used_m = res.get("transport"), res.get("microbatches")
        step_times.append(res.get("step_times", []))
        decode_times.append(res.get("decode_times", []))
        records.append(res.get("records", []))
        for k, out, why, err in zip(res["indices"], res["outputs"], res["finish_reasons"], res["errors"]):
            outputs[k], reasons[k], errors[k] = out, why, err
    return {"outputs": outputs, "finish_reasons": reasons, "errors": errors, "transport": transport,
            "microbatches": used_m, "step_times": step_times, "decode_times": decode_times, "records": records,
            "placement": placement}
