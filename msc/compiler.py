"""The compile driver: spec -> capture -> passes -> bundle on disk.

Two front ends share one back half. `compile_spec` builds a transformers model from a spec and
captures it through its family adapter; `msc.api.compile` captures a user's own nn.Module whose
attention, router and experts are marked with msc's decorators. Both hand a `Lowering` (captured graph,
plan, MoE shape, weight sources, the manifest's model facts) to `lower_and_write`, which runs the pass
pipeline, assigns roles to ranks and writes the bundle.

Output is written to a staging directory next to the target (`staged_output`) and renamed into place
only when everything succeeded, so a failed compile leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.fx as fx

from msc.bundle import Bundle, versions, write_bundle
from msc.capture import DTYPES, Captured, capture
from msc.checkpoint import CheckpointReader, checkpoint_expectations, materialize_random
from msc.tokenizer import record_tokenizer
from msc.errors import MscError
from msc.ir import graph_meta
from msc.models import adapter_for
from msc.pass_manager import PassContext, PassManager
from msc.plan import Plan, resolve_plan
from msc.spec import Spec


def load_hf_config(spec: Spec):
    """The transformers config of the spec's model, checked (msc.model_config_check) before anything is built."""
    from transformers import AutoConfig

    from msc.model_config_check import build_config, check_config

    m = spec.model
    if m.path is not None:
        p = Path(m.path)
        if not p.is_dir():
            raise MscError(f"model.path: checkpoint directory does not exist: {p}")
        if not (p / "config.json").is_file():
            raise MscError(f"model.path: {p} has no config.json; expected a Hugging Face checkpoint directory")
        try:
            config = AutoConfig.from_pretrained(str(p))
        except (ValueError, KeyError, OSError) as e:
            raise MscError(f"model.path: transformers cannot read the config in {p}: {str(e).splitlines()[0]}") from None
    else:
        config = build_config(m.config.get("model_type"), m.config)
    config = _text_config_of(config)
    check_config(config)
    return config


def _text_config_of(config):
    """The text config of a composite (vision-language) config whose causal LM is the text model's own class
    (Qwen3.5-MoE: `qwen3_5_moe` and `qwen3_5_moe_text` both build Qwen3_5MoeForCausalLM from the text config);
    any other config as it is. NOTE: msc compiles the language model, so it reads the sizes where that model does."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lms

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config or getattr(text, "model_type", None) is None:
        return config
    same = causal_lms.get(config.model_type) is not None and causal_lms.get(config.model_type) == causal_lms.get(text.model_type)
    return text if same else config


Progress = Callable[[str], None]


@dataclass
class Lowering:
    """Everything the back half of a compile needs, whichever front end captured the model."""

    spec: Spec
    plan: Plan
    moe: dict[str, int]  # num_experts, top_k, hidden_size, intermediate_size
    model: dict[str, Any]  # the manifest's "model" entry (model_type, dtype, checkpoint, layers, vocab, eos, moe keys)
    captured: Captured
    adapter: Any  # has checkpoint_source(param, keys, config, rows) (models/base.py FamilyAdapter, or msc.api's)
    hf_config: Any = None  # passed through to adapter.checkpoint_source
    checkpoint: CheckpointReader | None = None  # None: meta compile, weight sources not checked


def check_out_dir(out_dir: str | Path) -> Path:
    """The resolved output directory; MscError when it exists and is something other than a bundle."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not (out_dir / "manifest.json").is_file() and any(out_dir.iterdir()):
        raise MscError(f"output directory {out_dir} exists and is not an msc bundle; refusing to overwrite it")
    return out_dir


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A fresh staging directory beside `out_dir`, renamed onto it when the block succeeds, removed otherwise."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield stage
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def pipeline_entries(passes) -> list[dict] | None:
    """The spec's `passes:` as pass-manager entries. NOTE: a list without lower_roles (which every pipeline
    needs) configures passes of the default pipeline by name (`passes: [{name: place_experts, config: {...}}]`)
    instead of replacing the pipeline; a list with it is the whole pipeline."""
    from msc.pass_manager import DEFAULT_PIPELINE

    if passes is None:
        return None
    entries = [p.model_dump() for p in passes]
    if any(e["name"] == "lower_roles" for e in entries):
        return entries
    given = {e["name"]: e for e in entries}
    unknown = [n for n in given if n not in DEFAULT_PIPELINE]
    if unknown:
        raise MscError(f"passes: '{unknown[0]}' is not a pass of the default pipeline ({', '.join(DEFAULT_PIPELINE)}); "
                       "to add a pass, list the whole pipeline (ending with lower_roles)")
    return [given.get(n, {"name": n, "config": {}}) for n in DEFAULT_PIPELINE]


def _expert_placement(placement: dict) -> dict:
    """The manifest's record of place_experts: strategy, and per layer the slots (slot -> expert) and their shares."""
    return {"strategy": placement.get("strategy", "contiguous"),
            "slots": {str(k): v for k, v in placement.get("slots", {}).items()},
            "shares": {str(k): v for k, v in placement.get("shares", {}).items()}}


def attention_and_expert_roles(plan, programs: dict) -> list[dict]:
    """The bundle's role processes, by rank: attention replicas (the leader, tp rank 0, of each), expert nodes
    (likewise), then the other tensor-parallel ranks of the replicas (kind "attention_tp") and of the expert
    nodes ("expert_tp"). A role of a tp group names it: {"rank": r, "size": tp, "ranks": the group's global
    ranks, leader first}."""
    tp, etp, replicas = plan.attention.tp, plan.experts.tp, plan.attention.replicas
    nodes = sorted({n.split(".tp")[0] for n in programs if not n.startswith("attention")}, key=lambda n: int(n.split(".")[1]))
    # NOTE: leaders keep ranks 0..replicas-1 and replicas.. for the expert nodes, as without tp: the ranks that
    # talk to each other over M2N do not depend on tp; the followers only talk inside their groups
    first_follower = replicas + len(nodes)
    att_f = lambda i, r: first_follower + i * (tp - 1) + (r - 1)  # noqa: E731
    exp_f = lambda j, r: first_follower + replicas * (tp - 1) + j * (etp - 1) + (r - 1)  # noqa: E731
    leaders, followers = [], []
    for i in range(replicas):
        group = {"size": tp, "ranks": [i] + [att_f(i, r) for r in range(1, tp)]}
        leaders.append({"name": f"attention.{i}", "program": "attention" if tp == 1 else "attention.tp0",
                        "kind": "attention", "rank": i, "tp": {"rank": 0, **group}})
        followers += [{"name": f"attention.{i}.tp{r}", "program": f"attention.tp{r}", "kind": "attention_tp",
                       "rank": att_f(i, r), "tp": {"rank": r, **group}} for r in range(1, tp)]
    for j, name in enumerate(nodes):
        group = {"size": etp, "ranks": [replicas + j] + [exp_f(j, r) for r in range(1, etp)]}
        leaders.append({"name": name, "program": name if etp == 1 else f"{name}.tp0", "kind": "expert",
                        "rank": replicas + j, "tp": {"rank": 0, **group}})
        followers += [{"name": f"{name}.tp{r}", "program": f"{name}.tp{r}", "kind": "expert_tp", "rank": exp_f(j, r),
                       "tp": {"rank": r, **group}} for r in range(1, etp)]
    return sorted(leaders + followers, key=lambda role: role["rank"])


def lower_and_write(stage: Path, job: Lowering, say: Progress, t0: float) -> None:
    """Passes -> role programs -> ranks -> manifest; write the bundle into `stage` (checkpoint already there)."""
    spec, plan, captured = job.spec, job.plan, job.captured
    gm = captured.gm
    from msc.inspect import graph_summary

    captured_summary = graph_summary(gm, set(captured.constants))  # before the passes rewrite it
    graph_meta(gm).update({"spec": spec.model_dump(), "plan": plan.model_dump()})
    ctx = PassContext(
        plan=plan, moe=job.moe, adapter=job.adapter, hf_config=job.hf_config, checkpoint=job.checkpoint,
        constants=captured.constants,
    )
    # NOTE: the colocated program (attention, router and experts in one process) is the captured graph
    # itself, copied before the passes split it; it is written beside the role programs, not as a role.
    from msc.colocated import COLOCATED
    from msc.passes.lower_roles import LowerRoles

    keys = job.checkpoint.keys() if job.checkpoint is not None else None
    colocated = LowerRoles._program(COLOCATED, fx.GraphModule(gm, LowerRoles._copy(gm.graph)), {}, ctx, keys)
    manager = PassManager.from_entries(pipeline_entries(spec.passes))
    gm = manager.run(gm, ctx, progress=lambda name: say(f"pass {name}"))
    programs = graph_meta(gm).get("programs")
    if not programs:
        raise MscError("the pass pipeline produced no role programs; it must end with lower_roles")

    if plan.microbatches > 1 and "pipeline" not in graph_meta(gm):
        raise MscError(f"plan.microbatches = {plan.microbatches} needs the pipeline_microbatches pass, "
                       "which the spec's passes: list leaves out")
    roles = attention_and_expert_roles(plan, programs)
    manifest = {
        "format": 1,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spec": spec.model_dump(),
        "plan": plan.model_dump(),
        "device": spec.device,
        "model": job.model,
        "roles": roles,
        "placement": {str(k): v for k, v in graph_meta(gm)["placement"]["bounds"].items()},
        "expert_placement": _expert_placement(graph_meta(gm)["placement"]),
        "passes": graph_meta(gm)["passes"],
        "pipeline": graph_meta(gm).get("pipeline"),
        "capture_seconds": round(captured.seconds, 3),
        "captured": captured_summary,
        "colocated": {"program": COLOCATED},
    }
    say("writing bundle")
    every = {**programs, COLOCATED: colocated}
    expected = None
    if job.checkpoint is not None:  # what a checkpoint given at launch must match (msc.checkpoint.check_checkpoint)
        expected = checkpoint_expectations(job.checkpoint, (src for p in every.values() for src in p.weights.values()))
    write_bundle(stage, manifest=manifest, spec_dump=spec.model_dump(exclude_none=True), programs=every,
                 constants=captured.constants, expected_checkpoint=expected)
    (stage / "graphs").mkdir()
    (stage / "graphs" / "captured.py").write_text(gm.code)
    manifest["compile_seconds"] = round(time.perf_counter() - t0, 3)
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))


def relative_to_bundle(path: str | Path, bundle_dir: Path) -> str:
    """`path` as the bundle records it: relative to the bundle's final folder (`bundle_dir`, resolved; not
    the staging folder the compile writes into), so the manifest holds no absolute host path and a bundle
    moved together with its checkpoint still finds it."""
    # NOTE: both resolved (symlinks followed): Bundle.checkpoint_dir resolves bundle/REL the same way
    return os.path.relpath(Path(path).resolve(), Path(bundle_dir).resolve())


def compile_spec(spec: Spec, out_dir: str | Path, progress: Progress | None = None) -> Bundle:
    """Compile `spec` into a launch bundle at `out_dir` (replaced atomically if it exists)."""
    say = progress or (lambda msg: None)
    out_dir = check_out_dir(out_dir)
    t0 = time.perf_counter()
    hf_config = load_hf_config(spec)
    adapter = adapter_for(hf_config.model_type, hf_config)
    moe = adapter.moe_shape(hf_config)
    if spec.hardware is None:
        plan = resolve_plan(spec.plan, moe["num_experts"])

    with staged_output(out_dir) as stage:
        # NOTE: capture first: a model msc cannot handle fails before any weights are made or read.
        say("capturing with torch.export (meta device)")
        captured = capture(hf_config, adapter, spec.model.dtype)
        if spec.hardware is not None:  # the planner fills every plan field the spec leaves unset
            from msc.planner.cost import model_cost
            from msc.planner.plan_spec import fill_plan

            say("planning the deployment")
            plan_spec, _ = fill_plan(spec, model_cost(captured.gm, moe["top_k"], set(captured.constants)))
            spec = spec.model_copy(update={"plan": plan_spec})
            plan = resolve_plan(spec.plan, moe["num_experts"])
        checkpoint_rel: str | None
        if spec.model.path is not None:
            reader = CheckpointReader(Path(spec.model.path).resolve())
            checkpoint_rel = relative_to_bundle(spec.model.path, out_dir)
        elif spec.device == "meta":
            checkpoint_rel, reader = None, None
        else:
            say("materialising random weights")
            materialize_random(hf_config, spec.model.seed, DTYPES[spec.model.dtype], stage / "checkpoint")
            checkpoint_rel, reader = "checkpoint", CheckpointReader(stage / "checkpoint")

        model = {
            "model_type": hf_config.model_type,
            "dtype": spec.model.dtype,
            "checkpoint": checkpoint_rel,
            "num_hidden_layers": hf_config.num_hidden_layers,
            "num_moe_layers": captured.num_moe_layers,
            "vocab_size": hf_config.vocab_size,
            "eos_token_id": hf_config.eos_token_id,
            "max_position_embeddings": getattr(hf_config, "max_position_embeddings", None),
            # NOTE: by reference for a checkpoint (its folder), a small one built into the bundle otherwise
            "tokenizer": record_tokenizer(stage, hf_config, spec.model.path, say, bundle_dir=out_dir),
            **moe,
        }
        if spec.model.path is not None:  # NOTE: the bundle's spec (manifest, spec.yaml) names it relatively too
            spec = spec.model_copy(update={"model": spec.model.model_copy(update={"path": checkpoint_rel})})
        job = Lowering(spec=spec, plan=plan, moe=moe, model=model, captured=captured, adapter=adapter,
                       hf_config=hf_config, checkpoint=reader)
        lower_and_write(stage, job, say, t0)
    return Bundle.open(out_dir)
