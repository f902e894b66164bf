"""The `msc` command line: compile, run, serve, verify, inspect, plan, profile, bench, demo."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from msc.errors import MscError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="msc: compile Hugging Face MoE models for disaggregated serving.")
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        import msc

        out.print(f"msc {msc.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print msc's version and exit"),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error (Python logging of msc "
                                  "and the server)"),
) -> None:
    """msc: compile Hugging Face MoE models for disaggregated serving."""
    import logging

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(MscError(f"--log-level {log_level!r}: expected debug, info, warning or error"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("msc").setLevel(level)


def _fail(e: MscError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _checkpoint_option():
    """--checkpoint of the commands that run a bundle (one definition, the same help everywhere)."""
    return typer.Option(None, "--checkpoint", help="the checkpoint folder to read instead of the one the bundle names "
                        "(a bundle copied without it); checked against the bundle before anything starts")


def _mps_option():
    """--mps of the commands that start role processes."""
    return typer.Option(None, "--mps", help="run the roles of one GPU under CUDA MPS with these SM shares: "
                        "attention,expert percent (e.g. 100,100 or 40,60), or auto (from the spec's planner.profile, "
                        "measured by msc profile); with it decode steps hand off on the GPU (docs/engine.md)")


def _prefix_caching_option():
    """--prefix-caching/--no-prefix-caching of the commands that run an engine (default: the spec's)."""
    return typer.Option(None, "--prefix-caching/--no-prefix-caching", help="attach cached KV pages of a prompt's "
                        "prefix instead of computing them (default: the spec's runtime.prefix_caching, else on unless "
                        "the model has state layers); sets MSC_PREFIX_CACHE for every role process")


def _set_prefix_caching(value: Optional[bool]) -> None:
    """The flag as MSC_PREFIX_CACHE, which this process's engine and the role processes it starts read."""
    if value is not None:
        os.environ["MSC_PREFIX_CACHE"] = "1" if value else "0"


def _parse_ids(values: list[str]) -> list[list[int]]:
    prompts = []
    for v in values:
        try:
            prompts.append([int(x) for x in v.split(",") if x.strip()])
        except ValueError:
            raise MscError(f"--input-ids '{v}': expected comma-separated integer token ids, like 5,17,42") from None
    return prompts


@app.command("compile")
def compile_cmd(
    spec: Optional[Path] = typer.Argument(None, help="model.yaml; the embedded tiny Mixtral when omitted"),
    output: Path = typer.Option(..., "-o", "--output", help="bundle directory to write"),
):
    """Compile a model spec into a launch bundle."""
    from msc.compiler import compile_spec
    from msc.spec import default_spec, load_spec

    try:
        s = load_spec(spec) if spec is not None else default_spec()
        with err.status("compiling") as status:
            bundle = compile_spec(s, output, progress=lambda m: status.update(f"compiling: {m}"))
    except MscError as e:
        _fail(e)
    m = bundle.manifest
    err.print(
        f"wrote {bundle.path}: {len(m['roles'])} roles "
        f"({m['plan']['attention']['replicas']} attention replicas"
        f"{' × tp ' + str(m['plan']['attention']['tp']) if m['plan']['attention']['tp'] > 1 else ''}, "
        f"{m['plan']['experts']['nodes']} expert nodes"
        f"{' × tp ' + str(m['plan']['experts']['tp']) if m['plan']['experts']['tp'] > 1 else ''}) "
        f"in {m['compile_seconds']:.2f}s (capture {m['capture_seconds']:.2f}s)"
    )


@app.command("run")
def run_cmd(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    input_ids: list[str] = typer.Option(None, "--input-ids", help="one prompt as comma-separated token ids; repeat for more"),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=0),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    microbatches: Optional[int] = typer.Option(None, "--microbatches", min=1, max=8, help="override the plan's micro-batch count m"),
    delay_ms: Optional[str] = typer.Option(None, "--delay-ms", help="injected compute per layer, e.g. attention=20,expert=20"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="write the roles' timeline here (Chrome / Perfetto JSON)"),
    colocated: bool = typer.Option(False, "--colocated", help="run attention and experts in this one process "
                                   "(paged KV cache, Triton kernels; CUDA graphs on a GPU) instead of role processes"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the bundle's; --colocated: cuda if present)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="make random weights on the device instead of "
                                        "reading a checkpoint (runs a bundle compiled for the meta device)"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="sample from the k most likely tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="sample from the smallest set with this mass"),
    seed: Optional[int] = typer.Option(None, "--seed", help="sampling seed: prompt i draws with seed + i (repeatable runs)"),
    mps: Optional[str] = _mps_option(),
    checkpoint: Optional[Path] = _checkpoint_option(),
    record_routing: Optional[Path] = typer.Option(None, "--record-routing", help="write how many (token, expert) "
                                                  "pairs each expert got per layer: a routing profile for the planner "
                                                  "(planner: {routing: FILE}) and place_experts"),
    prefix_caching: Optional[bool] = _prefix_caching_option(),
):
    """Start every role as its own process and generate (or, --colocated, run it all in one process)."""
    _set_prefix_caching(prefix_caching)
    from msc.runtime.launcher import run_bundle
    from msc.verify import default_prompts
    from msc.bundle import Bundle

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if colocated:
        roles_only = {"--microbatches": microbatches, "--delay-ms": delay_ms, "--trace": trace, "--mps": mps}
        given = [name for name, v in roles_only.items() if v is not None]
        if given:
            _fail(MscError(f"{', '.join(given)} apply to the role processes; --colocated runs one process without them"))
        return _run_colocated(bundle, input_ids, max_new_tokens, as_json, device, random_weights, sampling, checkpoint,
                              record_routing)
    try:
        prompts = _parse_ids(input_ids) if input_ids else default_prompts(Bundle.open(bundle).manifest["model"]["vocab_size"])
        if max_new_tokens < 1:
            raise MscError("--max-new-tokens must be at least 1")
        delays = _parse_delays(delay_ms) if delay_ms else None
        shares = _mps_shares(Bundle.open(bundle), mps) if mps else None
        result = run_bundle(bundle, prompts, max_new_tokens, microbatches=microbatches, delay_ms=delays, trace=trace,
                            random_weights=random_weights, device=device, sampling=_per_prompt(sampling, len(prompts)),
                            mps=shares, checkpoint=checkpoint, record_routing=record_routing)
    except MscError as e:
        _fail(e)
    if record_routing is not None:
        err.print(f"wrote {record_routing}: the replicas' routing (planner: {{routing: FILE}}, place_experts' routing)")
    steps = result["step_times"][0] if result["step_times"] else []
    if as_json:
        cached = sum(n for recs in result["records"] for r in recs for _, n in r.get("cached", []))
        print(json.dumps({"outputs": result["outputs"], "finish_reasons": result["finish_reasons"],
                          "errors": result["errors"], "microbatches": result["microbatches"],
                          "step_times": result["step_times"], "prompt_tokens_cached": cached}))
    else:
        for p, o, e in zip(prompts, result["outputs"], result["errors"]):
            out.print(f"{p} -> {o}" if e is None else f"{p} -> error: {e}", markup=False)
        decode = sorted(result["decode_times"][0]) if result["decode_times"] else []
        if decode:
            prefill = sum(steps) - sum(decode)
            err.print(f"m = {result['microbatches']}: prefill {prefill * 1e3:.1f} ms, median decode step "
                      f"{decode[len(decode) // 2] * 1e3:.1f} ms over {len(decode)} steps")
    if trace:
        err.print(f"trace: {trace} (open in ui.perfetto.dev, or draw it: msc trace-plot {trace} -o timeline.png)")


def _run_colocated(bundle: Path, input_ids, max_new_tokens: int, as_json: bool, device: Optional[str],
                   random_weights: bool = False, sampling: dict | None = None, checkpoint: Optional[Path] = None,
                   record_routing: Optional[Path] = None) -> None:
    """The bundle's colocated program on the engine in this process (the same engine the roles run)."""
    import torch

    from msc.bundle import Bundle, resolve_checkpoint
    from msc.engine.build import build_engine
    from msc.runtime.worker import resolve_run_config
    from msc.runtime.roles import sampling_from_json
    from msc.verify import default_prompts

    try:
        b = Bundle.open(bundle)
        if "colocated" not in b.manifest:
            raise MscError(f"bundle {bundle} has no colocated program (compiled by an older msc); compile it again")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        prompts = _parse_ids(input_ids) if input_ids else default_prompts(b.manifest["model"]["vocab_size"])
        if max_new_tokens < 1:
            raise MscError("--colocated needs --max-new-tokens >= 1")
        params = [sampling_from_json({"max_tokens": max_new_tokens, **s}) for s in _per_prompt(sampling or {}, len(prompts))]
        resolve_run_config({"random_weights": random_weights, "checkpoint": None if checkpoint is None else str(checkpoint)},
                           b.manifest)
        ck = None if random_weights else resolve_checkpoint(b, checkpoint)
        gm = b.load_program(b.manifest["colocated"]["program"], dev, random_weights=random_weights, checkpoint=ck)
        # NOTE: no CUDA graphs while recording the routing: a graph's padding rows would be counted; no overlapped
        # steps either: the void token a stopping request computes would be
        rec = record_routing is not None
        engine = build_engine(b.manifest, gm, dev, cuda_graphs=not rec, overlap=False if rec else None)
        recorder = None
        if record_routing is not None:  # after build_engine: its KV-shape probe runs the program on a dummy token
            from msc.runtime import routing_recorder

            recorder = routing_recorder.record(b.manifest["model"]["num_experts"])
        try:
            reqs = engine.generate(prompts, params)
        finally:
            if recorder is not None:
                routing_recorder.stop()
        if recorder is not None:
            recorder.write(record_routing)
            err.print(f"wrote {record_routing}: the routing of {len(recorder.counts)} MoE layers (planner: "
                      "{routing: FILE} in a spec)")
    except MscError as e:
        _fail(e)
    recs = [r for r in engine.records if r.tokens]
    decode = sorted(r.seconds for r in recs if not r.prefill)
    prefill_s = sum(r.seconds for r in recs if r.prefill)
    if as_json:
        print(json.dumps({"outputs": [r.output for r in reqs], "finish_reasons": [r.finish_reason for r in reqs],
                          "prefill_s": prefill_s, "step_s": decode,
                          "prompt_tokens_cached": sum(n for r in recs for _, n in r.cached)}))
        return
    for p, r in zip(prompts, reqs):
        out.print(f"{p} -> {r.output}")
    if decode:
        err.print(f"colocated on {dev}: prefill {prefill_s * 1e3:.1f} ms, median decode step "
                  f"{decode[len(decode) // 2] * 1e3:.2f} ms over {len(decode)} steps")


def _per_prompt(sampling: dict, n: int) -> list[dict]:
    """The run's sampling options per prompt. NOTE: a seed is a stream of noise per position, so prompts
    that shared one would draw alike; prompt i gets seed + i (the run stays repeatable)."""
    seed = sampling.get("seed")
    return [{**sampling, "seed": None if seed is None else seed + i} for i in range(n)]


def _mps_shares(bundle, text: str) -> dict[str, int]:
    """--mps: explicit shares, or auto: in proportion to the profiled attention and expert times."""
    from msc.runtime.mps import parse_shares, shares_from_profile

    if text != "auto":
        return parse_shares(text)
    spec = bundle.manifest["spec"]
    path = (spec.get("planner") or {}).get("profile")
    if not path:
        raise MscError("--mps auto needs a measured profile: run `msc profile SPEC -o profile.json` and name it in "
                       "the spec (planner: {profile: profile.json}), or give the shares (--mps 40,60)")
    from msc.planner.perf import load_profile

    work = spec.get("workload") or {}
    context = work.get("input_len", 571) + work.get("output_len", 159) / 2
    shares = shares_from_profile(load_profile(path), bundle.manifest["plan"]["batch_size"],
                                 bundle.manifest["model"]["top_k"], context)
    err.print(f"MPS shares from {path}: attention {shares['attention']} %, expert {shares['expert']} %")
    return shares


def _parse_delays(text: str) -> dict[str, float]:
    delays = {}
    for part in text.split(","):
        side, _, value = part.partition("=")
        side = side.strip()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if side not in ("attention", "expert") or ms < 0:
            raise MscError(f"--delay-ms '{text}': expected side=milliseconds pairs with sides attention and expert, "
                           "like attention=20,expert=20")
        delays[side] = ms
    return delays


@app.command("trace-plot")
def trace_plot_cmd(
    trace: Path = typer.Argument(..., help="a trace written by msc run --trace"),
    output: Path = typer.Option(Path("timeline.png"), "-o", "--output", help="PNG to write"),
    steps: Optional[str] = typer.Option(None, "--steps", help="comma-separated steps to draw (default: the decode steps)"),
    title: Optional[str] = typer.Option(None, "--title"),
):
    """Draw a run's timeline: one lane per role, coloured by compute / send / recv / wait."""
    from msc.trace_plot import load_trace, plot_trace, summarize

    try:
        chosen = [int(x) for x in steps.split(",")] if steps else None
    except ValueError:
        _fail(MscError(f"--steps '{steps}': expected comma-separated step numbers, like 1,2,3"))
    try:
        t = load_trace(trace)
        summary = summarize(t, chosen)
        plot_trace(t, output, steps=chosen, title=title)
    except MscError as e:
        _fail(e)
    for side, idle in summary["sides"].items():
        if idle is not None:
            out.print(f"{side}: idle {idle:.0%}")
    err.print(f"wrote {output}")


@app.command("verify")
def verify_cmd(
    bundle: Path = typer.Argument(...),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    as_json: bool = typer.Option(False, "--json"),
):
    """Compare the bundle's generation with the original Hugging Face model's."""
    from msc.verify import verify_bundle

    try:
        r = verify_bundle(bundle, max_new_tokens=max_new_tokens)
    except MscError as e:
        _fail(e)
    if as_json:
        print(json.dumps(r))
    else:
        out.print(f"max |logit error| = {r['max_abs_logit_err']:.3g}; greedy tokens match: {r['tokens_match']}")
    if not r["tokens_match"]:
        raise typer.Exit(1)


@app.command("inspect")
def inspect_cmd(
    bundle: Path = typer.Argument(..., help="a compiled bundle directory"),
    role: str = typer.Option(None, "--role", help="also show this role's layers (e.g. expert.0)"),
    graph: bool = typer.Option(False, "--graph", help="with --role: print the role's program as Python code"),
    routing: Optional[Path] = typer.Option(None, "--routing", help="a routing profile: each expert node's expected "
                                           "load (default: the one place_experts was compiled with, if any)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (roles, passes, placement)"),
):
    """Show what the compiler did: the captured graph, then each role's layers, ops, parameters and bytes,
    and where the experts sit."""
    from msc.inspect import human_bytes, placement_report, program_code, role_layers, role_table

    try:
        rows, manifest = role_table(bundle)
        layer_rows = role_layers(bundle, role) if role else None
        code = program_code(bundle, role) if role and graph else None  # from the checked JSON: what runs
        placement = placement_report(bundle, routing)
    except MscError as e:
        _fail(e)
    if as_json:
        print(json.dumps({"roles": rows, "passes": [p["name"] for p in manifest["passes"]], "placement": placement,
                          **({"layers": layer_rows} if layer_rows is not None else {})}, default=str))
        return
    model = manifest["model"]
    cap = manifest.get("captured")
    if cap:
        top = ", ".join(f"{k}×{v}" for k, v in list(cap["ops"].items())[:8])
        out.print(f"[bold]captured graph[/bold]: {cap['nodes']:,} nodes, {model['num_hidden_layers']} layers "
                  f"({model.get('num_moe_layers', '?')} MoE), {cap['parameters']:,} parameters ({human_bytes(cap['bytes'])})")
        out.print(f"  ops: {top}{' …' if len(cap['ops']) > 8 else ''}")
    t = Table(title=f"{bundle} ({model['model_type']}, {model['dtype']}): split graph per role")
    for col in ("role", "rank", "tp group", "program", "layers", "nodes", "stages", "msc ops", "parameters", "bytes"):
        t.add_column(col, justify="right" if col in ("rank", "nodes", "stages", "parameters", "bytes") else "left")
    for r in rows:
        t.add_row(r["role"], str(r["rank"]), r["tp"], r["program"], r["layers"], str(r["nodes"]), str(r["stages"]), r["msc_ops"],
                  f"{r['parameters']:,}", r["bytes_h"])
    out.print(t)
    out.print("passes: " + " -> ".join(p["name"] for p in manifest["passes"]))
    pipe = manifest.get("pipeline")
    if pipe:
        out.print(f"pipeline: {pipe['microbatches']} micro-batch(es) per step, {pipe['schedule']}")
    _print_placement(placement)
    if layer_rows is not None:
        lt = Table(title=f"role {role}: per layer")
        for col in ("layer", "tensors", "parameters", "bytes", "msc ops"):
            lt.add_column(col, justify="left" if col == "msc ops" else "right")
        for r in layer_rows:
            lt.add_row(r["layer"], str(r["tensors"]), f"{r['parameters']:,}", r["bytes_h"], r["msc_ops"])
        out.print(lt)
        if code is not None:
            out.print(code, markup=False, highlight=False)


def _print_placement(p: dict) -> None:
    """The experts per node of the first MoE layer, and the expected loads where a routing profile is known."""
    first = min(p["nodes"][0]["experts"]) if p["nodes"] and p["nodes"][0]["experts"] else None
    if first is None:
        return
    t = Table(title=f"expert placement ({p['strategy']}), layer {first}"
                    + (f"; expected share of the pairs from {p['routing']}" if p["imbalance"] is not None else ""))
    t.add_column("node")
    t.add_column("experts")
    if p["imbalance"] is not None:
        t.add_column("expected load", justify="right")
    for j, node in enumerate(p["nodes"]):
        cells = [f"expert.{j}", ", ".join(map(str, node["experts"][first]))]
        if p["imbalance"] is not None:
            share = node["expected_load"].get(first)
            cells.append("" if share is None else f"{share:.1%}")
        t.add_row(*cells)
    out.print(t)
    if p["imbalance"] is not None:
        out.print(f"busiest node / mean, worst layer: {p['imbalance']:.2f} (contiguous: {p['contiguous_imbalance']:.2f})")


@app.command("launch")
def launch_cmd(
    bundle: Path = typer.Argument(..., help="bundle directory (the same on every node)"),
    engine: str = typer.Option("torchrun", "--engine", help="torchrun (one command per node) or ray (one command for a Ray cluster)"),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="torchrun: how many nodes run the bundle's roles"),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="torchrun: this node's rank (0 hosts the rendezvous)"),
    rdzv_endpoint: str = typer.Option("127.0.0.1:29500", "--rdzv-endpoint", help="torchrun: node 0's HOST:PORT"),
    job_port: Optional[int] = typer.Option(None, "--job-port", help="torchrun: node 0's job store port (default: rendezvous port + 1)"),
    join_timeout: float = typer.Option(120.0, "--join-timeout", min=1.0, help="torchrun: seconds to wait for every node to join"),
    print_only: bool = typer.Option(False, "--print", help="print the command of every node and exit"),
    serve: bool = typer.Option(False, "--serve", help="torchrun: serve requests instead of running prompts (node 0 "
                               "answers HTTP, as msc serve; the other nodes run their roles until node 0 stops)"),
    host: str = typer.Option("127.0.0.1", "--host", help="--serve: node 0's HTTP address"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="--serve: node 0's HTTP port"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: join this cluster (auto, HOST:PORT, ray://...); default: start a local one"),
    resources: Optional[str] = typer.Option(None, "--resources", help="ray: each side's Ray resources, "
                                            "attention=JSON,expert=JSON (either alone), e.g. 'expert={\"CPU\": 2}'"),
    input_ids: list[str] = typer.Option(None, "--input-ids", help="one prompt as comma-separated token ids; repeat for more"),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (node 0)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="the checkpoint folder on this node (default: the bundle's, relative to it)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the bundle's)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="make random weights on the device"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    top_k: int = typer.Option(0, "--top-k", min=0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, "--seed"),
):
    """Run a bundle's roles across machines: torchrun (each node runs this command with its --node-rank;
    node 0 prints the outputs) or a Ray cluster (roles as actors placed on the pools the plan names)."""
    from msc.bundle import Bundle
    from msc.verify import default_prompts

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    try:
        if engine not in ("torchrun", "ray"):
            raise MscError(f"--engine must be torchrun or ray, got {engine!r}")
        if serve and engine != "torchrun":
            raise MscError("--serve works with --engine torchrun (the Ray engine runs batches of prompts only)")
        b = Bundle.open(bundle)
        prompts = _parse_ids(input_ids) if input_ids else default_prompts(b.manifest["model"]["vocab_size"])
        run_options = {"random_weights": random_weights, "device": device}
        if checkpoint is not None:
            run_options["checkpoint"] = str(checkpoint)
        if engine == "torchrun":
            from msc.runtime import torchrun_launch

            if print_only:
                job_args = [a for ids in input_ids or [] for a in ("--input-ids", ids)]
                job_args += ["--max-new-tokens", str(max_new_tokens)] + (["--json"] if as_json else [])
                given = {"--checkpoint": checkpoint, "--device": device, "--job-port": job_port, "--seed": seed,
                         "--temperature": temperature or None, "--top-k": top_k or None,
                         "--top-p": top_p if top_p != 1.0 else None,
                         "--join-timeout": join_timeout if join_timeout != 120.0 else None}
                job_args += [a for k, v in given.items() if v is not None for a in (k, str(v))]
                job_args += ["--random-weights"] if random_weights else []
                job_args += ["--serve", "--port", str(port)] + (["--host", host] if host != "127.0.0.1" else []) if serve else []
                for line in torchrun_launch.node_commands(str(bundle), nnodes, rdzv_endpoint, job_args):
                    print(line)
                return
            job = torchrun_launch.NodeJob(str(bundle), nnodes, node_rank, rdzv_endpoint, prompts, max_new_tokens,
                                          sampling=_per_prompt(sampling, len(prompts)), job_port=job_port,
                                          join_timeout_s=join_timeout, run_options=run_options, serve=serve)
            if serve and node_rank == 0:
                from msc.http_middleware import public_address_warning

                public_address_warning(host, None)
            with err.status(f"node {node_rank} of {nnodes}: waiting for the rendezvous at {rdzv_endpoint}, then "
                            + ("starting the roles" if serve else "running")):
                result = torchrun_launch.run_node(job)
            if serve and result is not None:
                return _serve_http(result, bundle, host, port, None, True, None)
        else:
            from msc.runtime import ray_launch

            if print_only:
                print(f"msc launch {bundle} --engine ray" + (f" --address {address}" if address else ""))
                return
            result = ray_launch.run_bundle_on_ray(str(bundle), prompts, max_new_tokens, address=address,
                                                  sampling=_per_prompt(sampling, len(prompts)),
                                                  resources=ray_launch.parse_resources(resources) if resources else None,
                                                  **{k: v for k, v in run_options.items() if v})
    except MscError as e:
        _fail(e)
    if result is None:
        err.print(f"node {node_rank}: its roles finished" + ("" if serve else "; node 0 prints the outputs"))
        return
    if as_json:
        print(json.dumps({"outputs": result["outputs"], "finish_reasons": result["finish_reasons"], "errors": result["errors"]}))
    else:
        for p, o, e in zip(prompts, result["outputs"], result["errors"]):
            out.print(f"{p} -> {o}" if e is None else f"{p} -> error: {e}", markup=False)


def _serve_http(engine, bundle: Path, host: str, port: int, api_key: Optional[str], access_log: bool,
                served_model_name: Optional[str]) -> None:
    """Serve a started engine over HTTP under uvicorn until Ctrl-C / SIGTERM, then close the engine."""
    import logging

    import uvicorn

    from msc.server import create_app
    from msc.tokenizer import load_tokenizer

    try:
        try:
            tokenizer = load_tokenizer(engine.bundle.path, engine.bundle.manifest, engine.checkpoint)
        except MscError as e:
            _fail(e)
        if access_log:
            logging.getLogger("msc.access").setLevel(logging.INFO)
            if not logging.getLogger().handlers:
                logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app_ = create_app(engine, tokenizer=tokenizer, model_name=served_model_name, api_key=api_key)
        level = logging.getLevelName(logging.getLogger("msc").getEffectiveLevel()).lower()
        # NOTE: uvicorn's own access log is off: msc's gate logs each request once, as JSON
        config = uvicorn.Config(app_, host=host, port=port, log_level=level if level != "notset" else "warning",
                                access_log=False)
        server = uvicorn.Server(config)
        h = engine.health()
        name = app_.state.msc.model_name
        err.print(f"serving {bundle} as '{name}' on http://{host}:{port} ({h['replicas']} attention replicas, roles "
                  f"{', '.join(h['roles'])}, batch {h['batch_size']}, "
                  f"{'text and token ids' if tokenizer is not None else 'token ids only: the bundle has no tokenizer'})\n"
                  "  POST /v1/completions, /v1/chat/completions, /v1/generate; GET /v1/models, /health, /metrics",
                  highlight=False)
        try:
            server.run()
        except KeyboardInterrupt:
            pass  # NOTE: uvicorn re-raises the Ctrl-C it shut down on; for a server that is a normal stop
    finally:
        with err.status("stopping the engine"):
            engine.close()


@app.command("serve")
def serve_cmd(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free one)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the bundle's)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="make random weights on the device instead of "
                                        "reading a checkpoint (serves a bundle compiled for the meta device)"),
    microbatches: Optional[int] = typer.Option(None, "--microbatches", min=1, max=8, help="override the plan's micro-batch count m"),
    colocated: bool = typer.Option(False, "--colocated", help="serve the colocated program in this process "
                                   "(the same engine, experts in process) instead of the role processes"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="the model id clients name "
                                                    "(default: the bundle folder's name)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MSC_API_KEY", help="require 'Authorization: "
                                          "Bearer KEY' on /v1/ paths (also read from MSC_API_KEY)"),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="one JSON line per request on stderr"),
    max_restarts: int = typer.Option(3, "--max-restarts", min=0, help="restart the role processes after a role dies "
                                     "or hangs, at most this many times in 10 minutes (0: stay down and answer 503)"),
    checkpoint: Optional[Path] = _checkpoint_option(),
    mps: Optional[str] = _mps_option(),
    record_routing: Optional[Path] = typer.Option(None, "--record-routing", help="on shutdown, write how many (token, "
                                                  "expert) pairs each expert got per layer while serving (a routing "
                                                  "profile for the planner and place_experts)"),
    prefix_caching: Optional[bool] = _prefix_caching_option(),
):
    """Serve a bundle over HTTP with an OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /v1/models), msc's native /v1/generate (token ids), /health and /metrics (Prometheus)."""
    from msc.http_middleware import public_address_warning
    from msc.runtime.serving import ColocatedServingEngine, ServingEngine

    # NOTE: logged (logger msc.server), which the root handler of _root prints on stderr: said once, not twice
    public_address_warning(host, api_key)
    _set_prefix_caching(prefix_caching)
    try:
        if colocated:
            if microbatches is not None or mps is not None:
                raise MscError("--microbatches and --mps apply to the role processes; --colocated serves one process "
                               "without them")
            with err.status("loading the colocated program"):
                engine = ColocatedServingEngine(bundle, random_weights=random_weights, device=device,
                                                checkpoint=checkpoint, record_routing=record_routing).start()
        else:
            from msc.bundle import Bundle

            shares = _mps_shares(Bundle.open(bundle), mps) if mps else None
            engine = ServingEngine(bundle, random_weights=random_weights, device=device, microbatches=microbatches,
                                   max_restarts=max_restarts, checkpoint=checkpoint, mps=shares,
                                   record_routing=record_routing)
            with err.status(f"starting {len(engine.bundle.roles)} role processes"):
                engine.start()
    except MscError as e:
        _fail(e)
    _serve_http(engine, bundle, host, port, api_key, access_log, served_model_name)
    err.print(f"stopped: served {engine.served} requests" + (f"; wrote the routing to {record_routing}"
                                                             if record_routing is not None else ""))


@app.command("plan")
def plan_cmd(
    spec: Path = typer.Argument(..., help="model.yaml with hardware: (and optionally workload:, planner:)"),
    top: int = typer.Option(10, "--top", help="how many plans to print"),
    as_json: bool = typer.Option(False, "--json", help="print the plans as JSON instead of a table"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the spec with the best plan filled in"),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="draw the best plan's simulated decode step (PNG)"),
    colocated_batch: Optional[int] = typer.Option(None, "--colocated-batch", min=1, help="also compare with colocated "
                                                  "instances serving this many sequences (besides the largest batch "
                                                  "that meets the TPOT target and memory)"),
):
    """Search deployment plans: attention/expert parallel sizes, replicas, micro-batches and batch."""
    import json as _json

    _skip_teardown()
    from msc.planner.plan_spec import chosen_spec_dict, no_plan_note, plan_spec, plan_timeline, write_chosen
    from msc.spec import load_spec

    try:
        s = load_spec(spec)
        with err.status("planning: capturing the model on the meta device") as status:
            report = plan_spec(s, top=top, progress=lambda i, n: status.update(f"planning: {i}/{n} configurations")
                               if i % 500 == 0 or i == n else None)
        if output is not None:
            write_chosen(s, report, output)
        sim = plan_timeline(report, timeline) if timeline is not None and report.result.plans else None
    except MscError as e:
        _fail(e)
    if sim is not None:
        err.print(f"wrote {timeline}: simulated step {sim['iteration_s'] * 1e3:.1f} ms (model {sim['model_step_s'] * 1e3:.1f} ms), "
                  f"idle attention {sim['idle_attention']:.0%}, expert {sim['idle_expert']:.0%}")
    res, pl = report.result, report.planner
    colo = res.colocated
    colo_at = pl.colocated(batch=colocated_batch) if colocated_batch is not None else None
    gain_at = (lambda p: None if colo_at is None else pl.score(p) / pl.score(colo_at))  # noqa: E731
    unit = "$·h" if pl.objective == "cost" else "GPU"
    if as_json:
        rows = [{"plan": p.describe(), "attention": {"replicas": p.n_a, "tp": p.tp_a}, "experts": {"nodes": p.n_e, "tp": p.tp_e},
                 "microbatches": p.m, "batch": p.batch, "tpot_ms": p.step_s * 1e3, "tokens_per_s": p.tokens_per_s,
                 "per_gpu": p.per_gpu, "per_dollar_hour": p.per_dollar_hour, "gain": p.gain, "binding": p.binding,
                 "gpus": p.gpus, "t_a_ms": p.t_a * 1e3, "t_e_ms": p.t_e * 1e3, "t_c_ms": p.t_c * 1e3,
                 "tc_over_tf": p.tc_over_tf, "tc_below_tf": p.tc_over_tf < 1, "gain_at_colocated_batch": gain_at(p)}
                for p in res.plans]
        out.print_json(_json.dumps({"plans": rows, "colocated": None if colo is None else {
            "gpus": colo.gpus_per_instance, "batch": colo.batch, "tpot_ms": colo.step_s * 1e3, "per_gpu": colo.per_gpu,
            "per_dollar_hour": colo.per_dollar_hour}, "colocated_missing": None if colo is not None else pl.colocated_reason,
            "colocated_at_batch": None if colo_at is None else {
                "gpus": colo_at.gpus_per_instance, "batch": colo_at.batch, "tpot_ms": colo_at.step_s * 1e3,
                "per_gpu": colo_at.per_gpu, "per_dollar_hour": colo_at.per_dollar_hour},
            "note": no_plan_note(report), "evaluated": res.evaluated, "seconds": report.seconds,
            "chosen": chosen_spec_dict(s, report)["plan"] if res.plans else None}))
        return
    hw = s.hardware
    where = (f"{hw.pool.count}× {hw.pool.gpu}" if hw.pool else f"attention {hw.attention.count}× {hw.attention.gpu}, "
             f"experts {hw.experts.count}× {hw.experts.gpu}")
    t = Table(title=f"{spec.name}: {where}; TPOT ≤ {s.workload.tpot_ms:g} ms, {s.workload.input_len} in / "
                    f"{s.workload.output_len} out; ranked by tokens/s per {unit}")
    cols = ["plan", "GPUs", "batch", "TPOT ms", "tok/s/GPU", "tok/s per $/h", "gain vs colocated"]
    cols += [f"gain vs colocated@{colocated_batch:,}"] if colocated_batch is not None else []
    for col in cols + ["T_c/T_f", "binding"]:
        t.add_column(col, justify="left" if col in ("plan", "binding") else "right")
    for p in res.plans:
        # NOTE: T_c/T_f >= 1 (the reference's condition T_c < T_f broken) is marked: communication is not hidden
        tc = f"{p.tc_over_tf:.2f}" + (" ⚠" if p.tc_over_tf >= 1 else "")
        at = [] if colocated_batch is None else ["-" if colo_at is None else f"{gain_at(p):.2f}×"]
        t.add_row(p.describe(), str(p.gpus), f"{p.batch:,}", f"{p.step_s * 1e3:.1f}", f"{p.per_gpu:,.0f}",
                  f"{p.per_dollar_hour:,.0f}", "-" if p.gain is None else f"{p.gain:.2f}×", *at, tc, p.binding)
    if res.plans:
        out.print(t)
    if colo is not None:
        out.print(f"colocated baseline: instances of {colo.gpus_per_instance} GPUs, batch {colo.batch:,}, "
                  f"TPOT {colo.step_s * 1e3:.1f} ms, {colo.per_gpu:,.0f} tok/s/GPU, {colo.per_dollar_hour:,.0f} tok/s per $/h")
    elif pl.colocated_reason == "memory":
        out.print("colocated baseline: no instance size of the pool holds the weights and one sequence's KV cache")
    else:
        out.print("colocated baseline: no instance size fits the model within the TPOT target")
    if colocated_batch is not None:
        out.print(f"colocated at batch {colocated_batch:,}: " + (
            "no instance size holds it in memory" if colo_at is None else
            f"instances of {colo_at.gpus_per_instance} GPUs, TPOT {colo_at.step_s * 1e3:.1f} ms, "
            f"{colo_at.per_gpu:,.0f} tok/s/GPU, {colo_at.per_dollar_hour:,.0f} tok/s per $/h"))
    note = no_plan_note(report)
    if note:
        out.print(note)
    out.print(f"searched {res.evaluated:,} step evaluations in {report.seconds['search']:.2f}s "
              f"(capture and cost model {report.seconds['capture']:.2f}s)" + (f"; wrote {output}" if output else ""))


_SKIP_TEARDOWN = False


def _skip_teardown() -> None:
    """Ask `main` to end the process without the interpreter's teardown once the command has succeeded.

    NOTE: for `msc plan` only: it has written and closed everything it makes, started no process or thread,
    and holds no temporary file; the teardown it skips is the garbage collector walking the objects that
    torch and transformers created at import, ~1.2 s on a 2-core VM, a fifth of a cold run. Only the
    console entry point acts on it (a test calling the command in-process must not lose its process)."""
    global _SKIP_TEARDOWN
    _SKIP_TEARDOWN = True


@app.command("profile")
def profile_cmd(
    spec: Path = typer.Argument(..., help="model.yaml whose model is profiled (random weights made on the GPU)"),
    output: Path = typer.Option(Path("profile.json"), "-o", "--output", help="profile JSON for planner.profile"),
    batches: str = typer.Option("16,32,64,128,256", help="decode batch sizes to time"),
    contexts: str = typer.Option("571,730", help="two context lengths (tokens per sequence)"),
    expert_tokens: str = typer.Option("16,64,256,1024,4096", help="token counts for the experts alone"),
    gpu: Optional[str] = typer.Option(None, help="catalogue GPU the predictions use (default: the spec's pool, else H200)"),
    roles: bool = typer.Option(True, "--roles/--no-roles",
                               help="also run two role processes on this GPU and fit the exchange's hand-off cost"),
):
    """Measure attention and expert times on this GPU; write the planner's profile and compare its predictions."""
    from msc.profile import run_profile, write_profile
    from msc.spec import load_spec

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    try:
        report = run_profile(load_spec(spec), batches=ints(batches), contexts=ints(contexts),
                             expert_tokens=ints(expert_tokens), gpu_name=gpu, roles=roles, say=err.print)
        write_profile(report, output)
    except MscError as e:
        _fail(e)
    p = report.profile
    t = Table(title=f"msc profile on {report.meta['gpu']}: {p['model']}; predicted colocated decode step vs measured")
    for col in ("batch", "context", "measured ms", "predicted ms (profile)", "error", "roofline ms", "roofline error"):
        t.add_column(col, justify="right")
    for r in report.rows:
        t.add_row(str(r["batch"]), str(r["context"]), f"{r['measured_s'] * 1e3:.2f}", f"{r['predicted_s'] * 1e3:.2f}",
                  f"{r['error']:+.1%}", f"{r['roofline_s'] * 1e3:.2f}", f"{r['roofline_error']:+.1%}")
    out.print(t)
    if report.roles_rows:
        t = Table(title=f"two role processes on this GPU ({p['exchange']['how']}): predicted decode step vs measured")
        for col in ("batch", "context", "colocated ms", "roles measured ms", "roles predicted ms", "error"):
            t.add_column(col, justify="right")
        for r in report.roles_rows:
            t.add_row(str(r["batch"]), str(r["context"]), f"{r['colocated_measured_s'] * 1e3:.2f}",
                      f"{r['measured_s'] * 1e3:.2f}", f"{r['predicted_s'] * 1e3:.2f}", f"{r['error']:+.1%}")
        out.print(t)
        out.print(f"exchange hand-off: {p['exchange']['handoff_s'] * 1e6:.1f} µs each way per MoE layer beyond the link model")
    a, e = p["attention"], p["expert"]
    out.print(f"fits per layer: T_a = {a['k1'] * 1e6:.3f} µs·b + {a['k2'] * 1e6:.1f} µs (+ {a['k1_ctx'] * 1e9:.3f} ns·b·Δctx), "
              f"T_e = {e['k3'] * 1e6:.4f} µs·pairs + {e['k4'] * 1e6:.1f} µs; wrote {output} (use it as planner.profile)")


@app.command("env")
def env_cmd(all_vars: bool = typer.Option(False, "--all", help="also the variables msc sets for its own processes")):
    """msc's environment variables: what each does, its default and the value set now (checked)."""
    from rich.markup import escape

    from msc import env

    table = Table("variable", "now", "default", "takes", "what it does", show_lines=False)
    bad = []
    for var, value, error in env.check_all():
        if var.internal and not all_vars:
            continue
        shown = "(set)" if value and var.secret else escape(value or "")
        now = f"[red]{shown}[/]" if error else (shown if shown else "[dim]unset[/]")
        table.add_row(var.name, now, var.default or "—", var.describe_kind(), var.help)
        if error:
            bad.append(error)
    out.print(table)
    for error in bad:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(output: Path = typer.Option(Path("msc-demo"), "-o", "--output")):
    """Compile the embedded tiny Mixtral, run it as 3 processes, and verify it against transformers."""
    compile_cmd(None, output)
    from msc.verify import verify_bundle

    try:
        r = verify_bundle(output)
    except MscError as e:
        _fail(e)
    for p, o, ref in zip(r["prompts"], r["outputs"], r["reference_outputs"]):
        out.print(f"prompt {p}\n  msc          {o}\n  transformers {ref}")
    out.print(f"max |logit error| = {r['max_abs_logit_err']:.3g}; greedy tokens match: {r['tokens_match']}")
    if not r["tokens_match"]:
        raise typer.Exit(1)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table, write JSON (and a plot).")
app.add_typer(bench_app, name="bench")


@bench_app.command("m2n")
def bench_m2n_cmd(
    transports: str = typer.Option("", help="comma-separated transports (default: shm,tcp,torch_dist on cpu; cuda_ipc,"
                                   "torch_dist,nccl_all_to_all on cuda); torch_dist (gloo / NCCL) is the baseline"),
    sizes: str = typer.Option("2KB,4KB,8KB,16KB,32KB,64KB,128KB,256KB,512KB,1MB,2MB,4MB,8MB", help="message sizes"),
    mn: str = typer.Option("1,2,4,8", help="M = N values (each runs 2·M processes)"),
    scale: float = typer.Option(1.0, help="multiply the iteration counts"),
    output: Path = typer.Option(Path("m2n-bench.json"), "-o", "--output", help="JSON result"),
    plot_path: Optional[Path] = typer.Option(Path("m2n-bench.png"), "--plot", help="latency/throughput plot ('' for none)"),
    device: str = typer.Option("cpu", "--device", help="cpu (CPU tensors) or cuda (GPU tensors, rank r on GPU r mod count)"),
):
    """M2N latency (p50/p99) and throughput of each transport against torch.distributed, side by side."""
    from rich.progress import Progress

    from msc.bench import m2n

    try:
        mn_list = [int(x) for x in mn.split(",")]
        if any(v < 1 for v in mn_list):
            raise ValueError
    except ValueError:
        _fail(MscError(f"--mn '{mn}': expected comma-separated positive integers, like 1,2,4"))
    try:
        size_list = m2n.parse_sizes(sizes)
        tlist = [t.strip() for t in transports.split(",") if t.strip()] or None
        if tlist is not None and "torch_dist" not in tlist:
            tlist.append("torch_dist")
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task(f"M = N in {mn_list}", total=len(mn_list))
            result = m2n.run(tlist, size_list, mn_list, scale=scale, progress=lambda _: bar.advance(task), device=device)
    except MscError as e:
        _fail(e)
    where = f"{len(result['gpus'])} GPU(s) ({result['gpus'][0]})" if result.get("gpus") else f"{result['machine']['cores']} cores"
    base_name = "NCCL" if device == "cuda" else "gloo"
    table = Table(title=f"M2N round trip (dispatch + combine) on {where}")
    for col in ("M=N", "size", "transport", "p50 µs", "p99 µs", "GB/s", f"p50 / {base_name}", f"p99 / {base_name}"):
        table.add_column(col, justify="right")
    base = {(r["mn"], r["size"]): r for r in result["rows"] if r["transport"] == "torch_dist"}
    for r in result["rows"]:
        b = base.get((r["mn"], r["size"]))
        size = f"{r['size'] >> 20} MB" if r["size"] >= 1 << 20 else f"{r['size'] >> 10} KB"
        table.add_row(str(r["mn"]), size, r["transport"], f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['gbps']:.3f}",
                      f"{r['p50_us'] / b['p50_us']:.2f}" if b else "-", f"{r['p99_us'] / b['p99_us']:.2f}" if b else "-")
    out.print(table)
    for sk in result.get("skipped", []):
        err.print(f"skipped {sk['transport']} at M = N = {sk['mn']}: {sk['why']}")
    result["ratios_vs_torch_dist"] = m2n.ratios(result)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(output)
    out.print(f"wrote {output}")
    if plot_path and str(plot_path) not in ("", "."):
        m2n.plot(result, str(plot_path))
        out.print(f"wrote {plot_path}")


@bench_app.command("serve")
def bench_serve_cmd(
    url: Optional[str] = typer.Option(None, "--url", help="a running server's base URL, e.g. http://127.0.0.1:8000"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="start msc's server for this bundle in this process"),
    colocated: bool = typer.Option(False, "--colocated", help="with --bundle: serve the colocated program (one process)"),
    device: Optional[str] = typer.Option(None, "--device", help="with --bundle: cpu or cuda (default: the bundle's)"),
    random_weights: bool = typer.Option(False, "--random-weights", help="with --bundle: make random weights on the device"),
    num_requests: int = typer.Option(200, "--num-requests", min=1, help="requests to send"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="closed loop: this many clients, each "
                                              "sending its next request when its last one finished; with --request-rate: "
                                              "at most this many in flight (default without a rate: 64)"),
    request_rate: Optional[float] = typer.Option(None, "--request-rate", help="open loop: Poisson arrivals at this many "
                                                 "requests/s"),
    input_len: int = typer.Option(571, "--input-len", min=1, help="prompt tokens (the median, for reference)"),
    output_len: int = typer.Option(159, "--output-len", min=1, help="generated tokens (the median, for reference)"),
    distribution: str = typer.Option("reference", "--distribution", help="fixed (exact lengths) or reference (log-normal "
                                     "around the medians, σ 0.5, clipped to 4× the median and to the context)"),
    seed: int = typer.Option(0, "--seed", help="seeds the lengths, prompt token ids and arrival times"),
    model: Optional[str] = typer.Option(None, "--model", help="the model id to send (default: the server's, from /v1/models)"),
    token_range: str = typer.Option("10..200", "--token-range", help="prompt token ids are drawn from [LO, HI)"),
    shared_prefix: int = typer.Option(0, "--shared-prefix", min=0, help="every prompt starts with the same N tokens (a "
                                      "system prompt); the server's prefix-cache hits are reported where it counts them"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds a request may take before it counts as an error"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MSC_API_KEY", help="sent as 'Authorization: Bearer "
                                          "KEY' (also read from MSC_API_KEY)"),
    output: Path = typer.Option(Path("serve-bench.json"), "-o", "--output", help="JSON result"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Load an OpenAI-compatible server with streaming completions: TTFT, TPOT, latency and throughput."""
    from contextlib import ExitStack

    from msc.bench import serve

    try:
        if (url is None) == (bundle is None):
            raise MscError("give exactly one of --url (a running server) or --bundle (start one in this process)")
        if url is not None and (colocated or device or random_weights):
            raise MscError("--colocated, --device and --random-weights apply to --bundle (a server started here)")
        tokens = serve.parse_token_range(token_range)
        with ExitStack() as stack:
            if bundle is not None:
                with err.status(f"starting a server for {bundle}"):
                    url = stack.enter_context(serve.local_server(bundle, colocated=colocated, device=device,
                                                                 random_weights=random_weights))
            result = serve.run_bench(url, num_requests=num_requests, concurrency=concurrency, request_rate=request_rate,
                                     input_len=input_len, output_len=output_len, distribution=distribution, seed=seed,
                                     model=model, timeout_s=timeout, progress=not no_progress, token_range=tokens,
                                     api_key=api_key, shared_prefix=shared_prefix)
            if bundle is not None:
                result["config"]["bundle"] = str(bundle)
                result["config"]["colocated"] = colocated
        serve.print_table(result, out)
        serve.write_json(result, output)
    except MscError as e:
        _fail(e)
    for message, count in list(result["error_messages"].items())[:5]:
        err.print(f"{count} request(s) failed: {message}", highlight=False, soft_wrap=True)
    out.print(f"wrote {output}")
    if result["requests"] == 0:
        _fail(MscError(f"none of the {result['errors']} requests completed"))


def main() -> None:
    from msc.runtime.lifecycle import exit_on_sigterm

    exit_on_sigterm()  # SIGTERM stops role processes and removes temporary folders, as Ctrl-C does
    try:
        app()
    except SystemExit as e:
        if _SKIP_TEARDOWN and e.code in (0, None):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


if __name__ == "__main__":
    sys.exit(main())
