"""One role process: `python -m msc.runtime.worker --bundle DIR` (what torchrun or `msc run` starts).

Rendezvous is torch.distributed's env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which torchrun
sets: rank 0 hosts a TCPStore that every role uses to find its peers, and the M2N endpoint of the
bundle's transport is opened through it (`auto`: shared memory when all roles share a host, which
LOCAL_WORLD_SIZE == WORLD_SIZE tells, else tcp). The rank picks the role from the bundle's manifest.
Attention replicas run the engine (msc.engine) on their share of the requests file's prompts (prompt i
goes to replica i mod n_a; the file may give each prompt its sampling parameters and the engine step at
which it arrives) and write a result file with the outputs and the engine's step records.

`--run-config FILE` (JSON, every key optional) overrides the bundle for this run: `microbatches` (the
plan's m), `delay_ms` ({"attention": ms, "expert": ms}, the spec's runtime.delay_ms) and `trace_dir`
(each role writes its timeline there as trace.RANK.json), `serve` ({"host", "port", "token"}: the attention
replicas take requests from a serving process, msc.runtime.serving, instead of a requests file),
`checkpoint` (the checkpoint folder to read instead of the bundle's own: the launcher's msc.bundle.
resolve_checkpoint, checked before any role starts).
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from msc import env as msc_env
from msc.backends.comm import m2n
from msc.bundle import Bundle
from msc.errors import MscError
from msc.runtime import serve_link
from msc.runtime.exchange import AttentionExchange, ExpertExchange
from msc.engine.build import build_engine
from msc.runtime import device_exchange, job_store, lifecycle, tensor_parallel
from msc.runtime.roles import AttentionRole, ExpertRole, sampling_from_json
from msc.runtime.trace import Trace

FAULT_ROLE = "MSC_FAULT_EXIT_ROLE"  # test hook: this role exits abruptly ...
FAULT_AFTER = "MSC_FAULT_EXIT_AFTER"  # ... after this many forwards


def _fault_hook(role_name: str):
    """Test hook: exit abruptly once this role has run FAULT_AFTER steps (attention) or batches (expert)."""
    if os.environ.get(FAULT_ROLE) != role_name:
        return None
    after = int(os.environ.get(FAULT_AFTER, "1"))

    def hook(count: int) -> None:
        if count >= after:
            os._exit(17)

    return hook


def load_run_config(path: str | None, manifest: dict) -> dict:
    """The bundle's run settings with the overrides in JSON file `path` applied."""
    return resolve_run_config(json.loads(Path(path).read_text()) if path else {}, manifest, f"run config {path}")


def resolve_run_config(over: dict, manifest: dict, source: str = "run options") -> dict:
    """The bundle's run settings (plan's m, spec's delays, no trace) with `over` applied and checked."""
    spec_delay = manifest["spec"]["runtime"].get("delay_ms") or {}
    cfg = {"microbatches": manifest["plan"]["microbatches"], "trace_dir": None,
           "delay_ms": {"attention": spec_delay.get("attention", 0.0), "expert": spec_delay.get("expert", 0.0)},
           "random_weights": False, "device": None, "serve": None, "checkpoint": None, "record_routing": False}
    unknown = set(over) - set(cfg)
    if unknown:
        raise MscError(f"{source}: unknown keys {sorted(unknown)}; expected {sorted(cfg)}")
    cfg.update({k: v for k, v in over.items() if k != "delay_ms" and v is not None})
    delay = over.get("delay_ms") or {}
    if set(delay) - {"attention", "expert"}:
        raise MscError(f"{source}: delay_ms takes the keys attention and expert, got {sorted(delay)}")
    cfg["delay_ms"].update(delay)
    m = cfg["microbatches"]
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 8:
        raise MscError(f"{source}: microbatches must be an integer from 1 to 8, got {m!r}")
    if any(not isinstance(v, (int, float)) or v < 0 for v in cfg["delay_ms"].values()):
        raise MscError(f"{source}: delay_ms values must be milliseconds >= 0, got {cfg['delay_ms']}")
    serve = cfg["serve"]
    if serve is not None and (not isinstance(serve, dict) or set(serve) != {"host", "port", "token"}):
        raise MscError(f"{source}: serve takes the keys host, port and token, got {serve!r}")
    if cfg["device"] not in (None, "cpu", "cuda"):
        raise MscError(f"{source}: device must be cpu or cuda, got {cfg['device']!r}")
    cfg["device"] = cfg["device"] or manifest["device"]
    if cfg["device"] == "meta":
        raise MscError(f"{source}: the bundle was compiled for the meta device and has no weights: run it with random "
                       "weights on a real device (msc run --random-weights --device cuda|cpu)")
    ck = cfg["checkpoint"]
    if ck is not None and (not isinstance(ck, str) or not ck):
        raise MscError(f"{source}: checkpoint must be the path of a checkpoint folder, got {ck!r}")
    if ck is not None and cfg["random_weights"]:
        raise MscError(f"{source}: a checkpoint ({ck}) and random weights exclude each other; give one of them")
    if not cfg["random_weights"] and ck is None and manifest["model"].get("checkpoint") is None:
        raise MscError(f"{source}: the bundle has no weights (no checkpoint); run it with random weights "
                       "(msc run --random-weights) or compile it with device: cpu")
    return cfg


def role_device(device: str, rank: int) -> str:
    """The device this role runs on. NOTE: on a GPU host each role takes GPU LOCAL_RANK mod the GPU count:
    one GPU a role when there are enough (attention replicas on some GPUs, expert nodes on the others),
    else roles share GPUs round-robin (on one GPU every role runs on it)."""
    if device != "cuda":
        return device
    count = torch.cuda.device_count()
    if count == 0:
        raise MscError("the bundle was compiled for device: cuda, but this machine has no CUDA device")
    index = int(os.environ.get("LOCAL_RANK", rank)) % count
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def _rendezvous_store(addr: str, port: int, world: int, rank: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The run's TCPStore (rank 0 hosts it). NOTE: torch's store listens on every interface; started by msc's
    own launcher (every role on this host, MASTER_ADDR 127.0.0.1) rank 0 hands it a socket bound to that
    address instead, so nothing outside the machine can reach the rendezvous."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent hosts it (c10d rendezvous)
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    if rank != 0 or not os.environ.get(lifecycle.PARENT_ENV):
        return dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        raise MscError(f"rank 0 cannot host the rendezvous on {addr}:{port}: {e}") from None
    sock.listen(1024)
    store = dist.TCPStore(addr, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.fileno())
    _KEEP_ALIVE.append(sock)  # the store serves on this socket for the life of the process
    return store


_KEEP_ALIVE: list = []


def run_worker(bundle_dir: str, requests: str | None, result: str | None, run_config: str | None = None) -> None:
    bundle = Bundle.open(bundle_dir)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    roles = bundle.roles
    if world != len(roles):
        raise MscError(f"WORLD_SIZE={world} but the bundle has {len(roles)} roles")
    role = roles[rank]
    runtime = bundle.manifest["spec"]["runtime"]
    timeout = datetime.timedelta(seconds=runtime["timeout_s"])
    cfg = load_run_config(run_config, bundle.manifest)
    device = cfg["device"]
    trace = Trace(role["name"], rank, enabled=cfg["trace_dir"] is not None)
    place = role_device(device, rank)  # this role's own device: cuda:K on a GPU host
    program = bundle.load_program(role["program"], place, random_weights=cfg["random_weights"], checkpoint=cfg["checkpoint"])
    one_host = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    transport = m2n.resolve_transport(runtime.get("transport", "auto"), device=device, one_host=one_host)
    store = _rendezvous_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank, timeout)
    use_pg = transport == "torch_dist"
    if use_pg:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    endpoint = links = None
    tp = role.get("tp") or {"rank": 0, "size": 1, "ranks": [rank]}
    try:
        att_ranks = [r["rank"] for r in roles if r["kind"] == "attention"]  # the replicas (their tp leaders)
        exp_ranks = [r["rank"] for r in roles if r["kind"] == "expert"]
        if tp["size"] > 1:
            gpu_of = (lambda r: r % torch.cuda.device_count()) if device == "cuda" and one_host else None  # role_device's map
            tensor_parallel.join(tensor_parallel.make_group(store, tp, place, timeout, gpu_of), tp["rank"], tp["size"])
        peers = att_ranks if role["kind"] == "expert" else exp_ranks
        host = msc_env.text("MSC_M2N_HOST")  # declared default: 127.0.0.1
        if role["kind"] not in ("attention_tp", "expert_tp"):  # NOTE: a tp follower talks to its leader only
            endpoint = m2n.connect(transport, rank, peers, store, timeout_s=runtime["timeout_s"], device=device, host=host,
                                   buffer_bytes=runtime.get("buffer_bytes", 4 << 20), borrow=True)
        recording = bool(cfg["record_routing"])  # NOTE: graphs would count their padding rows: none while recording
        if endpoint is not None and not recording and device_exchange.wanted(
                device=device, transport=transport, replicas=len(att_ranks), tp_size=tp["size"],
                delays=any(v > 0 for v in cfg["delay_ms"].values()), one_host=one_host,
                distinct_gpus=device == "cuda" and torch.cuda.device_count() >= world):
            links = device_exchange.connect(store, rank, peers, "expert" if role["kind"] == "expert" else "attention",
                                            device_exchange.dims_of(bundle.manifest, cfg["microbatches"]), place,
                                            runtime["timeout_s"])
        if role["kind"] in ("expert", "expert_tp"):
            if role["kind"] == "expert_tp":
                comm = tensor_parallel.ExpertFollowerExchange(place)
            else:
                comm = ExpertExchange(endpoint, att_ranks, place)
                if tp["size"] > 1:
                    comm = tensor_parallel.ExpertLeaderExchange(comm)
            worker = ExpertRole(program, comm, delay_s=cfg["delay_ms"]["expert"] / 1e3, trace=trace)
            if links is not None:
                worker.device_steps = device_exchange.ExpertDeviceSteps(links, worker.program)
            worker.on_batch = _fault_hook(role["name"])
            worker.serve()
            return
        replica = att_ranks.index(tp["ranks"][0])
        m = bundle.manifest
        heartbeat_s = runtime["timeout_s"] / 4
        if role["kind"] == "attention_tp":
            exchange = tensor_parallel.FollowerExchange(heartbeat_s)
        else:
            exchange = AttentionExchange(endpoint, exp_ranks, place, heartbeat_s=heartbeat_s)
            if tp["size"] > 1:
                exchange = tensor_parallel.LeaderExchange(exchange)
        req = None if cfg["serve"] is not None else json.loads(Path(requests).read_text())
        engine = build_engine(m, program, place, exchange=exchange, microbatches=cfg["microbatches"], trace=trace,
                              delay_s=cfg["delay_ms"]["attention"] / 1e3, keep_logits=bool(req and req.get("dump_logits")))
        if links is not None:
            engine.runner.device_exchange = device_exchange.AttentionDeviceExchange(links, exchange, exp_ranks)
        recorder = None
        if recording and role["kind"] == "attention":
            engine.runner.stage_graphs = None
            from msc.runtime import routing_recorder

            recorder = routing_recorder.record(m["model"]["num_experts"], routing_recorder.slot_maps_of(m))
        worker = AttentionRole(engine, exchange)
        worker.on_step = _fault_hook(role["name"])
        if cfg["serve"] is not None:
            if role["kind"] == "attention_tp":
                worker.serve_follower()
                return
            srv = cfg["serve"]
            link = serve_link.connect(srv["host"], int(srv["port"]), srv["token"], replica, runtime["timeout_s"])
            try:
                worker.serve(link)
                if recorder is not None:  # told to stop: the serving process sums the replicas' counts
                    out = Path(result.replace("{rank}", str(rank)))
                    out.with_suffix(".tmp").write_text(json.dumps({"routing": recorder.profile()["layers"]}))
                    out.with_suffix(".tmp").replace(out)
            finally:
                link.close()
            return
        n = len(req["prompts"])
        mine = list(range(replica, n, len(att_ranks)))
        limits = req["max_new_tokens"] if isinstance(req["max_new_tokens"], list) else [req["max_new_tokens"]] * n
        sampling = req.get("sampling") or [{}] * n
        arrivals = req.get("arrivals") or [0] * n
        params = [sampling_from_json({"max_tokens": limits[i], **sampling[i]}) for i in mine]
        done = worker.run_batch([req["prompts"][i] for i in mine], params, [arrivals[i] for i in mine])
        if role["kind"] == "attention_tp":
            return  # its leader reports the replica's results (the same tokens)
        out = Path(result.replace("{rank}", str(rank)))
        if req.get("dump_logits"):
            save_file({f"prompt_{i}": torch.stack(r.logits).contiguous() for i, r in zip(mine, done) if r.logits},
                      str(out.with_suffix(".safetensors")))
        steps, decode = worker.step_times()
        records = [{"step": r.step, "decode": r.decode, "prefill": r.prefill, "cached": r.cached,
                    "preempted": r.preempted, "finished": r.finished, "seconds": r.seconds} for r in engine.records]
        tmp = out.with_suffix(".tmp")
        result = json.dumps({"indices": mine, "outputs": [r.output for r in done],
                                   "finish_reasons": [r.finish_reason for r in done],
                                   "errors": [r.error for r in done],
                                   "request_ids": [r.id for r in done], "records": records,
                                   "forwards": len(steps), "transport": transport,
                                   "captured_segments": engine.runner.captured_segments,
                                   "device_steps": engine.runner.device_steps_run,
                                   "step_times": steps, "decode_times": decode, "microbatches": cfg["microbatches"],
                                   **({"routing": recorder.profile()["layers"]} if recorder is not None else {})})
        tmp.write_text(result)
        tmp.replace(out)
        job_store.report(f"result/{rank}", result)  # msc launch across nodes: node 0 collects the results
    finally:
        if tp["size"] > 1:
            tensor_parallel.leave(clean=sys.exc_info()[0] is None)
        if trace.enabled:
            trace.write(Path(cfg["trace_dir"]) / f"trace.{rank}.json")
        if links is not None:
            links.close()
        if endpoint is not None:
            endpoint.close()
        if use_pg:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one msc role process")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--requests")
    ap.add_argument("--result", default="result.{rank}.json")
    ap.add_argument("--run-config", help="JSON overrides for this run: microbatches, delay_ms, trace_dir")
    args = ap.parse_args(argv)
    # NOTE: `kill -USR1 PID` prints every thread's Python stack to this role's log: where a stuck role waits
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    lifecycle.watch_parent()  # started by a launcher: end with it
    lifecycle.exit_on_sigterm()  # stopped by its launcher (torchrun tearing a failed job down): say so on the way out
    heartbeat = lifecycle.Heartbeat(int(os.environ.get("RANK", 0))).start()
    # NOTE: a role process does not tune the fused MoE's tiles on first use (backends/compute/moe_tune.py):
    # tuning a bucket takes tens of seconds inside a step its peers wait on with a timeout. Tiles tuned by the
    # colocated engine, `msc profile` or the benchmark on this machine (the disk cache), or a GPU's table, are
    # used; otherwise the heuristic (announced once). MSC_MOE_AUTOTUNE=1 in the environment overrides this.
    os.environ.setdefault("MSC_MOE_AUTOTUNE", "0")
    try:
        profile_dir = msc_env.raw("MSC_PROFILE_DIR")  # a debugging aid: one cProfile dump per role process
        if profile_dir:
            import cProfile

            prof = cProfile.Profile()
            try:
                prof.runcall(run_worker, args.bundle, args.requests, args.result, args.run_config)
            finally:
                prof.dump_stats(str(Path(profile_dir) / f"role.{os.environ.get('RANK', 0)}.prof"))
        else:
            run_worker(args.bundle, args.requests, args.result, args.run_config)
    except MscError as e:
        _report_failure(e)
        print(f"msc worker rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
        return 1
    except (MemoryError, torch.OutOfMemoryError) as e:
        _report_failure(e)
        print(f"msc worker rank {os.environ.get('RANK')}: out of memory: {_first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        _report_failure(e)
        raise  # the traceback goes to the role's log
    except SystemExit as e:  # SIGTERM (lifecycle.exit_on_sigterm): its launcher stops it
        _report_failure(e)
        raise
    finally:
        heartbeat.stop()
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _report_failure(e: BaseException) -> None:
    """Tell the launcher why this role fails (RUN_DIR/failure.RANK.json), before it exits: the launcher
    names the role that failed on its own rather than a peer that only saw it go (kind "peer")."""
    run_dir = os.environ.get(lifecycle.RUN_DIR_ENV)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        error = f"out of memory: {_first_line(e)}"
    elif isinstance(e, MscError):
        error = _first_line(e)
    elif isinstance(e, SystemExit):
        error = "stopped by a signal from its launcher"
    else:
        error = f"{type(e).__name__}: {_first_line(e)}"
    # NOTE: "peer" (it lost a peer) and "stopped" (its launcher ended it) are consequences of another failure
    kind = "peer" if isinstance(e, m2n.PeerError) else "stopped" if isinstance(e, SystemExit) else "own"
    record = {"kind": kind, "error": error, "time": time.time(),
              "node": os.environ.get(job_store.NODE_ENV)}
    job_store.report(f"failure/{os.environ.get('RANK', 0)}", json.dumps(record))
    if not run_dir:
        return
    path = Path(run_dir) / f"failure.{os.environ.get('RANK', 0)}.json"
    try:
        path.with_suffix(".tmp").write_text(json.dumps(record))
        path.with_suffix(".tmp").replace(path)
    except OSError:
        pass

if __name__ == "__main__":
    sys.exit(main())
