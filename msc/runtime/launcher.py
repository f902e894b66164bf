"""Local launch: start every role of a bundle as its own process on this machine and collect results.

The processes rendezvous exactly as under torchrun (env:// on 127.0.0.1). The launcher watches them:
a role that exits non-zero stops the run at once with a message naming it; a run that outlives its
deadline is stopped too. Nothing waits without a bound.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from msc.bundle import Bundle, resolve_checkpoint
from msc.errors import MscError
from msc.runtime import lifecycle
from msc.runtime.roles import sampling_from_json
from msc.runtime.trace import merge_traces
from msc.runtime.worker import resolve_run_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def spawn_roles(bundle: Bundle, workdir: Path, run_config: dict, env: dict[str, str] | None = None,
                requests: Path | None = None, mps=None, tag: str = "") -> list[tuple[dict, subprocess.Popen]]:
    """Start one worker process per role of `bundle` on this machine (rendezvous on 127.0.0.1), each
    logging to workdir/NAME.log; `run_config` is written to workdir/run-config.json for them to read.
    mps: (MpsDaemon, {"attention": %, "expert": %}) to run each role under MPS with its SM share.
    tag: the run's shared-memory tag (msc.runtime.lifecycle); the roles exit and clean up once this
    process is gone."""
    (workdir / "run-config.json").write_text(json.dumps(run_config))
    roles = bundle.roles
    # NOTE: Triton's interpreter (TRITON_INTERPRET=1, what the test suite sets to check kernels on a CPU) would
    # make every CPU role run its decode attention through numpy; roles take the plain CPU path unless the
    # caller's env asks for the interpreter explicitly.
    inherited = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base_env = {**inherited, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "WORLD_SIZE": str(len(roles)), "LOCAL_WORLD_SIZE": str(len(roles)), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                **lifecycle.role_env(workdir, tag)}
    procs = []
    try:
        for r in roles:
            # NOTE: -P (safe path): the folder the run starts from is not put on sys.path, so a .py file there
            # (in a bundle folder, say) cannot shadow an import of the role process
            cmd = [sys.executable, "-P", "-m", "msc.runtime.worker", "--bundle", str(bundle.path),
                   "--result", str(workdir / "result.{rank}.json"), "--run-config", str(workdir / "run-config.json")]
            if requests is not None:
                cmd += ["--requests", str(requests)]
            with open(workdir / f"{r['name']}.log", "w") as log:
                role_env = {**base_env, "RANK": str(r["rank"]), "LOCAL_RANK": str(r["rank"])}
                if mps is not None:
                    daemon, shares = mps
                    role_env.update(daemon.env(shares["expert" if r["kind"] == "expert" else "attention"]))
                procs.append((r, subprocess.Popen(cmd, env=role_env,
                                                  stdout=log, stderr=subprocess.STDOUT)))
    except BaseException:
        stop_roles(procs)
        raise
    return procs


def stop_roles(procs: list[tuple[dict, subprocess.Popen]], grace_s: float = 0.0) -> None:
    """Kill whatever of `procs` still runs (after up to grace_s for them to end by themselves) and reap it."""
    deadline = time.monotonic() + grace_s
    for _, p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def heartbeat_bound_s(manifest: dict) -> float:
    """How long a role may stay silent (no heartbeat) before it counts as hung: runtime.heartbeat_timeout_s."""
    return manifest["spec"]["runtime"].get("heartbeat_timeout_s") or lifecycle.DEFAULT_HEARTBEAT_TIMEOUT_S


SECONDARY = ("peer", "stopped")  # failure kinds that follow from another role's failure (msc.runtime.worker)


def failure_message(procs: list[tuple[dict, subprocess.Popen]], workdir: Path, settle_s: float = 2.0) -> str | None:
    """The message naming the role that failed first, or None if every role still runs or ended well.

    NOTE: when one role fails, its peers fail soon after with "peer ... died"; the first exit seen need not
    be the cause. So this waits up to settle_s for the others, then prefers a role that failed on its own
    (an exception of its own, or killed by a signal) over one that only lost a peer, and the earliest."""
    failed = [(r, p) for r, p in procs if p.poll() not in (None, 0)]
    if not failed:
        return None
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and any(p.poll() is None for _, p in procs):
        own = [r for r, p in procs if p.poll() not in (None, 0) and _failure(workdir, r).get("kind") not in SECONDARY]
        if own:
            break
        time.sleep(0.02)
    failed = [(r, p) for r, p in procs if p.poll() not in (None, 0)]
    def rank_key(item):
        r, _ = item
        f = _failure(workdir, r)
        return (f.get("kind") in SECONDARY, f.get("time", 0.0))
    r, p = min(failed, key=rank_key)
    f = _failure(workdir, r)
    cause = f.get("error") or _tail(workdir / f"{r['name']}.log")
    return f"role {r['name']} (rank {r['rank']}) {lifecycle.describe_exit(p.returncode)}: {cause}"


def _failure(workdir: Path, role: dict) -> dict:
    """What a role wrote about its own failure before exiting (msc.runtime.worker), or {}."""
    try:
        return json.loads((workdir / f"failure.{role['rank']}.json").read_text())
    except (OSError, ValueError):
        return {}


def watch_roles(procs: list[tuple[dict, subprocess.Popen]], workdir: Path, deadline: float, heartbeat_s: float) -> None:
    """Wait until every role has ended well; MscError naming the culprit when one fails, stays silent for
    more than heartbeat_s (stopped or hung), or the run outlives its deadline."""
    while True:
        msg = failure_message(procs, workdir)
        if msg is not None:
            raise MscError(msg)
        running = [r for r, p in procs if p.poll() is None]
        if not running:
            return
        silent = lifecycle.silence_message(workdir, running, heartbeat_s)
        if silent:
            raise MscError(silent)
        if time.monotonic() > deadline:
            raise MscError(f"run timed out; still running: {', '.join(r['name'] for r in running)}")
        try:
            next(p for _, p in procs if p.poll() is None).wait(timeout=0.05)
        except (subprocess.TimeoutExpired, StopIteration):
            pass


def check_requests(bundle: Bundle, prompts: list[list[int]], max_new_tokens: int | list[int],
                   sampling: list[dict] | None = None, arrivals: list[int] | None = None) -> None:
    """MscError (one line) for a batch that no role could run: empty prompts, token ids outside the vocabulary,
    per-prompt lists of the wrong length, bad sampling parameters or arrivals. Every launcher (msc run, msc
    launch with torchrun or Ray) checks here, before any process starts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MscError("every prompt needs at least one token id")
    vocab = bundle.manifest["model"]["vocab_size"]
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise MscError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
    for name, val in (("sampling", sampling), ("arrivals", arrivals),
                      ("max_new_tokens", max_new_tokens if isinstance(max_new_tokens, list) else None)):
        if val is not None and len(val) != len(prompts):
            raise MscError(f"{name} has {len(val)} entries for {len(prompts)} prompts; expected one per prompt")
    if arrivals is not None and any(not isinstance(a, int) or isinstance(a, bool) or a < 0 for a in arrivals):
        raise MscError(f"arrivals are engine steps (integers >= 0), got {arrivals!r}")
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    for n, extra in zip(limits, sampling or [{}] * len(prompts)):  # bad parameters fail here, not in a role process
        sampling_from_json({"max_tokens": n, **extra})


def role_log_tail(workdir: Path, role: dict) -> str:
    """The last lines a role process logged (for error messages)."""
    return _tail(workdir / f"{role['name']}.log")


def run_bundle(
    bundle_dir: str | Path,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    *,
    dump_logits: bool = False,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    microbatches: int | None = None,
    delay_ms: dict[str, float] | None = None,
    trace: str | Path | None = None,
    random_weights: bool = False,
    device: str | None = None,
    sampling: list[dict] | None = None,
    arrivals: list[int] | None = None,
    mps: dict[str, int] | None = None,
    checkpoint: str | Path | None = None,
    record_routing: str | Path | None = None,
) -> dict:
    """Generate greedily for `prompts` with the bundle's roles.

    Returns {"outputs", "transport", "microbatches", "step_times" (seconds per forward, per attention
    replica), "decode_times" (the same, decode forwards only), "logits"?}. `microbatches` and `delay_ms` override the bundle's plan and spec for this run;
    `trace` writes the roles' merged timeline there (Chrome / Perfetto JSON). `random_weights`: every role
    makes its weights on its device (msc.random_weights; the way to run a meta-compiled bundle), on
    `device` (cpu or cuda; default: the bundle's). `max_new_tokens`: one limit or one per prompt;
    `record_routing`: write the replicas' routing profile there (msc.runtime.routing_recorder).
    `sampling`: per prompt, SamplingParams fields (temperature, top_k, top_p, seed, stop_token_ids,
    ignore_eos); `arrivals`: per prompt, the step of its replica's engine at which it joins (continuous
    batching without wall-clock timing). `mps`: {"attention": %, "expert": %}, run the roles (on one GPU) under
    CUDA MPS with those SM shares (msc.runtime.mps). `checkpoint`: the checkpoint folder to read instead of the
    bundle's own (checked against the bundle before any role starts; msc.bundle.resolve_checkpoint). The result adds "finish_reasons" ("stop", "length" or "error"),
    "errors" (the message of a prompt that could never run, else None), "records" (per replica, the
    engine's step records), "captured_segments" and "device_steps" (per replica: graphs captured, decode steps
    run through the device exchange, msc.runtime.device_exchange).
    """
    bundle = Bundle.open(bundle_dir)
    check_requests(bundle, prompts, max_new_tokens, sampling, arrivals)
    if trace is not None and not Path(trace).parent.resolve().is_dir():
        raise MscError(f"trace file {trace}: directory {Path(trace).parent} does not exist")
    run_config = {"microbatches": microbatches, "delay_ms": delay_ms, "random_weights": random_weights, "device": device,
                  "checkpoint": None if checkpoint is None else str(checkpoint), "record_routing": record_routing is not None}
    resolve_run_config(run_config, bundle.manifest)  # bad overrides fail here, before any process starts
    if not random_weights:  # a missing or mismatching checkpoint, too
        run_config["checkpoint"] = resolve_checkpoint(bundle, checkpoint)
    roles = bundle.roles
    deadline = time.monotonic() + (timeout_s or bundle.manifest["spec"]["runtime"]["timeout_s"] * 4)
    tag = lifecycle.new_run_tag()
    with tempfile.TemporaryDirectory(prefix="msc-run-") as tmp:
        tmp = Path(tmp)
        (tmp / "requests.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens, "dump_logits": dump_logits,
                                                        "sampling": sampling, "arrivals": arrivals}))
        run_config["trace_dir"] = str(tmp) if trace else None
        procs, daemon = [], None
        try:
            if mps is not None:
                if (device or bundle.manifest["device"]) != "cuda":
                    raise MscError("--mps shares a GPU between role processes: run with --device cuda")
                from msc.runtime.mps import MpsDaemon

                daemon = MpsDaemon(tmp).start()
            procs = spawn_roles(bundle, tmp, run_config, env, requests=tmp / "requests.json",
                                mps=(daemon, mps) if daemon is not None else None, tag=tag)
            watch_roles(procs, tmp, deadline, heartbeat_bound_s(bundle.manifest))
        finally:
            stop_roles(procs)
            lifecycle.sweep_shm(tag)
            if daemon is not None:
                daemon.stop()
        outputs: list = [None] * len(prompts)
        reasons: list = [None] * len(prompts)
        errors: list = [None] * len(prompts)
        logits: list = [None] * len(prompts)
        transport, used_m, step_times, decode_times, records, captured, device = None, None, [], [], [], [], []
        routing: dict[int, list[int]] = {}
        for r in roles:
            if r["kind"] != "attention":
                continue
            res = json.loads((tmp / f"result.{r['rank']}.json").read_text())
            transport, used_m = res.get("transport"), res.get("microbatches")
            step_times.append(res.get("step_times", []))
            decode_times.append(res.get("decode_times", []))
            records.append(res.get("records", []))
            captured.append(res.get("captured_segments", 0))
            for layer, c in (res.get("routing") or {}).items():  # the replicas' counts add up
                routing[int(layer)] = [a + b for a, b in zip(routing[int(layer)], c)] if int(layer) in routing else list(c)
            device.append(res.get("device_steps", 0))
            for i, out, why, err in zip(res["indices"], res["outputs"], res["finish_reasons"], res["errors"]):
                outputs[i], reasons[i], errors[i] = out, why, err
            if dump_logits:
                f = tmp / f"result.{r['rank']}.safetensors"
                saved = load_file(str(f)) if f.exists() else {}
                for i in res["indices"]:
                    logits[i] = saved.get(f"prompt_{i}", torch.empty(0))
        if trace:
            spec_delay = bundle.manifest["spec"]["runtime"].get("delay_ms") or {}
            meta = {"bundle": str(bundle.path), "microbatches": used_m, "delay_ms": {**spec_delay, **(delay_ms or {})},
                    "model": bundle.manifest["model"]["model_type"], "layers": bundle.manifest["model"]["num_hidden_layers"],
                    "roles": [r["name"] for r in roles], "transport": transport}
            merge_traces([tmp / f"trace.{r['rank']}.json" for r in roles], trace, meta)
    if record_routing is not None:
        from msc.runtime.routing_recorder import write_profile

        write_profile(routing, bundle.manifest["model"]["num_experts"], record_routing)
    result = {"outputs": outputs, "finish_reasons": reasons, "errors": errors, "transport": transport, "microbatches": used_m,
              "step_times": step_times, "decode_times": decode_times, "records": records,
              "captured_segments": captured, "device_steps": device}
    if dump_logits:
        result["logits"] = logits
    return result
