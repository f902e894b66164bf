"""Programs are data, never code: a bundle's program JSON can name only allow-listed call targets, dtypes and
friends come from fixed tables, names cannot smuggle Python into fx's generated code, every program and
weight map matches the digest recorded at compile time, and `msc inspect --graph` shows what will run."""
from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import shutil
import sys
import uuid

import pytest
import torch

from msc.bundle import Bundle
from msc.compiler import compile_spec
from msc.errors import MscError
from msc.ir import allowed_target, graph_from_json
from msc.program_targets import ATEN_TARGETS
from msc.spec import parse_spec
from tests.models.families import FAMILIES, GENERIC_FAMILIES, RUNNING_STATE_FAMILIES


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    """A private copy of the session's tiny bundle, safe to tamper with."""
    shutil.copytree(tiny_bundle.path, tmp_path / "b")
    return tmp_path / "b"


def _edit(bundle_dir, rel: str, change, *, update_digest: bool = True) -> None:
    """Rewrite bundle file `rel` (JSON) with change(data); record its new digest unless told not to (so the
    allow-list check, not the digest check, is what a test exercises)."""
    path = bundle_dir / rel
    data = json.loads(path.read_text())
    change(data)
    raw = json.dumps(data).encode()
    path.write_bytes(raw)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if update_digest and "digests" in manifest:
        manifest["digests"][rel] = hashlib.sha256(raw).hexdigest()
        (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


def _insert_before_output(node: dict):
    def change(program):
        program["nodes"].insert(len(program["nodes"]) - 1, node)
    return change


def _call(name: str, target, *args, **kwargs) -> dict:
    return {"name": name, "op": "call_function", "target": target, "args": {"$tuple": list(args)}, "kwargs": kwargs}


def _program(*nodes: dict) -> dict:
    """A minimal stored program: input x, the given nodes, output x."""
    return {"format": 1, "nodes": [
        {"name": "x", "op": "placeholder", "target": "x", "args": {"$tuple": []}, "kwargs": {}}, *nodes,
        {"name": "output", "op": "output", "target": "output", "args": {"$tuple": [{"$node": "x"}]}, "kwargs": {}},
    ]}


# ---------------------------------------------------------------------------------------------- the two code-execution routes
def test_a_stored_import_module_target_is_refused_and_never_imports(bundle_copy, tmp_path, monkeypatch):
    marker = f"msc_payload_{uuid.uuid4().hex}"
    (tmp_path / f"{marker}.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('1')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    target = "torch.ops.import_module.__self__.import_module"
    _edit(bundle_copy, "programs/attention.json", _insert_before_output(_call("payload", target, marker)))

    with pytest.raises(MscError, match=r"node 'payload' calls 'torch\.ops\.import_module\.__self__\.import_module'.*"
                                       r"not an allowed call target"):
        Bundle.open(bundle_copy).load_program("attention")
    assert marker not in sys.modules
    assert not (tmp_path / f"{marker}.ran").exists()


def test_a_stored_load_library_target_is_refused_and_never_loads(bundle_copy, tmp_path, monkeypatch):
    loaded = []
    # NOTE: patched on the class, so the attack's attribute walk (load_library.__self__.load_library) would
    # reach the recorder if anything resolved or ran it
    monkeypatch.setattr(type(torch.ops), "load_library", lambda self, path: loaded.append(path))
    library = str(tmp_path / "libpayload.so")
    target = "torch.ops.load_library.__self__.load_library"
    _edit(bundle_copy, "programs/expert.0.json", _insert_before_output(_call("payload", target, library)))

    with pytest.raises(MscError, match=r"node 'payload' calls 'torch\.ops\.load_library\.__self__\.load_library'"):
        Bundle.open(bundle_copy).load_program("expert.0")
    assert loaded == []


@pytest.mark.parametrize("target", [
    "torch.ops.aten.from_file.default",  # a real aten op that reads any file
    "torch.ops.aten.save.default",
    "torch.ops.aten.mm",  # too few parts
    "torch.ops.aten.mm.default.extra",  # too many
    "torch.ops.msc._private.default",
    "torch.ops.msc.experts.__call__",
    "torch.ops.msc.no_such_op.default",
    "torch.ops.myns.op.default",
    "torch.ops.__class__.__init__.__globals__",
    "torch.load.__self__.x.y",
    "builtins.eval",
    "os.system",
    "operator.attrgetter",
    42,
])
def test_targets_off_the_allow_list_are_refused_without_attribute_lookups(target, monkeypatch):
    looked_up = []

    class Spy:
        def __getattr__(self, name):
            looked_up.append(name)
            raise AttributeError(name)

    monkeypatch.setattr(torch, "ops", Spy())
    with pytest.raises(MscError, match=r"node 'bad' calls .* not an allowed call target"):
        graph_from_json(_program(_call("bad", target, {"$node": "x"})))
    assert looked_up == []


# ---------------------------------------------------------------------------------------------- fixed tables, names, references
@pytest.mark.parametrize("encoding, message", [
    ({"$dtype": "load"}, "unknown dtype 'load'"),
    ({"$dtype": "__builtins__"}, "unknown dtype"),
    ({"$layout": "ops"}, "unknown layout 'ops'"),
    ({"$memory_format": "hub"}, "unknown memory format 'hub'"),
    ({"$device": "cuda:7"}, "only the marker 'role'"),
    ({"$code": "1"}, "unknown argument encoding"),
    ([1, 2], "not a stored value"),
])
def test_tampered_dtype_and_other_encodings_are_refused(bundle_copy, encoding, message):
    def change(program):
        recv = next(n for n in program["nodes"] if n["target"] == "torch.ops.msc.expert_recv.default")
        assert recv["args"]["$tuple"][3] == {"$dtype": "float32"}  # the node this test tampers with
        recv["args"]["$tuple"][3] = encoding

    _edit(bundle_copy, "programs/expert.0.json", change)
    with pytest.raises(MscError, match=rf"expert\.0\.json: node 'expert_recv_default': .*{message}"):
        Bundle.open(bundle_copy).load_program("expert.0")


def test_a_tampered_weight_map_dtype_is_refused(bundle_copy):
    def change(wmap):
        next(iter(wmap.values()))["dtype"] = "load"

    _edit(bundle_copy, "weights/expert.1.json", change)
    with pytest.raises(MscError, match=r"weights/expert\.1\.json: weight '.*': unknown dtype 'load'"):
        Bundle.open(bundle_copy).load_program("expert.1")


def test_names_cannot_carry_python_into_the_generated_code():
    marker = f"msc_injected_{uuid.uuid4().hex}"
    payload = f"__import__('sys').modules.setdefault('{marker}', 1)"
    placeholder = _program()
    placeholder["nodes"][0]["target"] = f"x = {payload}"
    keyword = _program(_call("s", "torch.ops.aten.sum.dim_IntList", {"$node": "x"}, {"$list": [0]}))
    keyword["nodes"][1]["kwargs"] = {f"keepdim={payload}, dtype": None}
    weight = _program({"name": "w", "op": "get_attr", "target": "__class__.__init__", "args": {"$tuple": []}, "kwargs": {}})
    for program, message in ((placeholder, "input name"), (keyword, "keyword arguments"), (weight, "weight name")):
        with pytest.raises(MscError, match=message):
            torch.fx.GraphModule({}, graph_from_json(program))(torch.zeros(2))
    assert marker not in sys.modules


@pytest.mark.parametrize("nodes, message", [
    ([_call("y", "torch.ops.aten.neg.default", {"$node": "z"})], "refers to node 'z', which is not an earlier node"),
    ([_call("y", "torch.ops.aten.neg.default", {"$node": "y"})], "refers to node 'y', which is not an earlier node"),
    ([{"name": "m", "op": "call_module", "target": "os", "args": {"$tuple": []}, "kwargs": {}}], "unsupported node kind 'call_module'"),
    ([{"name": "m", "op": "call_method", "target": "__reduce__", "args": {"$tuple": []}, "kwargs": {}}], "unsupported node kind"),
    ([_call("x", "torch.ops.aten.neg.default", {"$node": "x"})], "name 'x' is used by an earlier node"),
    ([{"name": "y", "op": "placeholder"}], "is not a stored node"),
])
def test_malformed_nodes_are_one_clear_error(nodes, message):
    with pytest.raises(MscError, match=message):
        graph_from_json(_program(*nodes))


def test_program_names_cannot_leave_the_bundle(bundle_copy):
    with pytest.raises(MscError, match="not a plain file name"):
        Bundle.open(bundle_copy).load_program("../../etc/passwd")


# ---------------------------------------------------------------------------------------------- digests
def _neg_to_abs(program):
    """An edit that keeps the program allowed but changes what it computes."""
    node = next(n for n in program["nodes"] if n["target"] == "torch.ops.aten.neg.default")
    node["target"] = "torch.ops.aten.abs.default"


def _double_a_shape(wmap):
    entry = next(iter(wmap.values()))
    entry["shape"][0] *= 2


@pytest.mark.parametrize("rel, change", [("programs/attention.json", _neg_to_abs), ("weights/attention.json", _double_a_shape)])
def test_a_file_edited_after_compilation_is_refused(bundle_copy, rel, change):
    _edit(bundle_copy, rel, change, update_digest=False)
    assert hashlib.sha256((bundle_copy / rel).read_bytes()).hexdigest() != Bundle.open(bundle_copy).manifest["digests"][rel]
    with pytest.raises(MscError, match=rf"{rel} of bundle .* was modified after compilation: digest mismatch"):
        Bundle.open(bundle_copy).load_program("attention")


def test_digests_are_those_of_the_files_written(tiny_bundle):
    digests = tiny_bundle.manifest["digests"]
    expected = {str(p.relative_to(tiny_bundle.path)) for d in ("programs", "weights") for p in (tiny_bundle.path / d).glob("*.json")} | {"checkpoint.json"}
    assert set(digests) == expected
    for rel, digest in digests.items():
        assert hashlib.sha256((tiny_bundle.path / rel).read_bytes()).hexdigest() == digest


def test_a_bundle_without_digests_must_be_compiled_again(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["digests"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MscError, match="records no digests .* compile it again"):
        Bundle.open(bundle_copy).load_program("expert.0")


# ---------------------------------------------------------------------------------------------- inspect --graph
def test_inspect_graph_renders_the_checked_json_not_the_stored_code(bundle_copy):
    from typer.testing import CliRunner

    from msc.cli import app

    (bundle_copy / "programs" / "expert.0.py").write_text("def forward(self):\n    STORED_CODE_NOT_RUN = 1\n")
    # an allowed but different op in the JSON: the rendering must show it
    _edit(bundle_copy, "programs/expert.0.json", _insert_before_output(_call("extra", "torch.ops.aten.arange.default", 3)))
    program = json.loads((bundle_copy / "programs" / "expert.0.json").read_text())
    r = CliRunner().invoke(app, ["inspect", str(bundle_copy), "--role", "expert.0", "--graph"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "STORED_CODE_NOT_RUN" not in r.output
    for n in program["nodes"]:
        if n["op"] == "call_function" and n["target"].startswith("torch.ops."):
            assert f"{n['target']}(" in r.output, n["target"]

    _edit(bundle_copy, "programs/expert.0.json", _insert_before_output(_call("bad", "torch.ops.aten.from_file.default", "/etc/passwd")))
    r = CliRunner().invoke(app, ["inspect", str(bundle_copy), "--role", "expert.0", "--graph"])
    assert r.exit_code != 0 and "not an allowed call target" in r.output


# ---------------------------------------------------------------------------------------------- the allow-list covers what msc emits
def test_every_allow_listed_aten_name_is_a_real_op_of_that_name():
    for name in ATEN_TARGETS:
        _, _, ns, op, overload = name.split(".")
        resolved = getattr(getattr(torch.ops.aten, op), overload)
        assert isinstance(resolved, torch._ops.OpOverload) and allowed_target(name) is resolved
        assert f"{resolved.namespace}.{resolved._opname}.{resolved._overloadname}" == f"{ns}.{op}.{overload}"


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_every_target(bundle: Bundle) -> set[str]:
    """Every call target stored in `bundle` is allowed, and every program loads (weights too when it has a
    checkpoint) with exactly its stored targets; the targets seen."""
    seen = set()
    for path in sorted((bundle.path / "programs").glob("*.json")):
        stored = [n["target"] for n in json.loads(path.read_text())["nodes"] if n["op"] == "call_function"]
        refused = [t for t in stored if allowed_target(t) is None]
        assert not refused, (path, refused)
        name = path.name.removesuffix(".json")
        load = (lambda: bundle.load_program(name)) if bundle.manifest["model"]["checkpoint"] is not None else (
            lambda: bundle.load_program(name, random_weights=True))
        with _env(MSC_FUSE="0"):  # as stored, without the load-time fusions (msc/fusions.py)
            gm = load()
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [allowed_target(t) for t in stored]
        # fused: the stored targets less the fused chains, plus msc's own fused ops (and getitem of their pairs)
        fused_ops = {torch.ops.msc.rms_norm.default, torch.ops.msc.add_rms_norm.default, torch.ops.msc.rotary.default,
                     operator.getitem}
        extra = {n.target for n in load().graph.nodes if n.op == "call_function"} - {allowed_target(t) for t in stored}
        assert extra <= fused_ops, extra
        seen |= set(stored)
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_target_the_default_passes_emit_for_a_family_is_allowed(family_bundle, family):
    _, bundle, _ = family_bundle(family)
    seen = _check_every_target(bundle)
    assert any(t.startswith("torch.ops.msc.") for t in seen) and any(t.startswith("torch.ops.aten.") for t in seen)


@pytest.mark.parametrize("family", sorted(FAMILIES) + sorted(GENERIC_FAMILIES) + sorted(RUNNING_STATE_FAMILIES))
def test_targets_of_tensor_parallel_and_micro_batched_programs_are_allowed(family, tmp_path):
    config = {**FAMILIES, **GENERIC_FAMILIES, **RUNNING_STATE_FAMILIES}[family]
    # olmoe's attention is not split by tensor parallelism (its q comes from no head projection), nor Qwen3-Next's
    # and Qwen3.5's (gated before o_proj)
    attention = {"replicas": 2} if family in ("olmoe", "qwen3_next", "qwen3_5_moe_text") else {"tp": 2}
    spec = parse_spec({"model": {"config": config, "seed": 0, "dtype": "bfloat16"}, "device": "meta",
                       "plan": {"experts": {"nodes": 2}, "attention": attention, "microbatches": 2}})
    _check_every_target(compile_spec(spec, tmp_path / family))
