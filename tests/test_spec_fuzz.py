"""Spec input hardening: every bad `model.yaml` is one line, never a traceback or a hang.

The fuzz tests feed generated specs (mutated valid specs, garbage bytes, random text, alias graphs, deep
nesting) through what `msc compile` does first: `load_spec` and the model-config check. Each case either
loads or fails with an MscError whose message is one line that starts with the file (and line) or names
the `model.config` / `model.path` key. Where a mutation is invalid by construction (a bool for an integer,
an unknown key, a negative size, top-k above the expert count) the case must fail. The explicit tests below
pin the cases of issue 25.
"""
from __future__ import annotations

import glob
import math
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msc.compiler import load_hf_config
from msc.errors import MscError
from msc.spec import DEFAULT_SPEC_YAML, MAX_DEPTH, MAX_EXPANDED_VALUES, default_spec, load_spec
from tests.conftest import tiny_spec_dict
from tests.models.families import FAMILIES

CASE_SECONDS = 5.0  # the bound on one case (the bound for an alias bomb)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

_pool = ThreadPoolExecutor(max_workers=1)
_dir = tempfile.TemporaryDirectory(prefix="msc-spec-fuzz-")


def _load_and_check(path: Path):
    """What `msc compile` does with a spec before capturing anything."""
    spec = load_spec(path)
    if spec.model.config is not None:
        load_hf_config(spec)
    return spec


def _run_case(content: bytes | str, must_fail: bool = False) -> MscError | None:
    """Write `content` as a spec file, load and check it within CASE_SECONDS; assert that a failure is one
    clear line (and that there is one when `must_fail`). Returns the error, if any."""
    path = Path(_dir.name) / "model.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    t0 = time.perf_counter()
    future = _pool.submit(_load_and_check, path)
    try:
        future.result(timeout=CASE_SECONDS)
        error = None
    except MscError as e:
        error = e
    # NOTE: any other exception type propagates and fails the case, as does a TimeoutError (a hang)
    assert time.perf_counter() - t0 < CASE_SECONDS
    if error is None:
        assert not must_fail, f"accepted an invalid spec:\n{content!r:.2000}"
        return None
    _assert_one_clear_line(str(error), str(path))
    return error


_CLEAR = (r"{path}:\d+: \S", r"{path}: \S", r"model\.config(\.[A-Za-z_][\w.]*)?: \S", r"model\.path: \S")


def _assert_one_clear_line(msg: str, path: str) -> None:
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg
    assert len(msg) < 2000, f"message too long ({len(msg)} characters): it echoes its input"
    assert any(re.match(p.format(path=re.escape(path)), msg) for p in _CLEAR), msg


# ------------------------------------------------------------------------------------------------ strategies
_JUNK_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["8", "1.5", "true", "yes", "null", "", "~", "0x10", "1e3", "-1", "cuda", "mixtral", "float32"]),
)
_JUNK = st.recursive(_JUNK_SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=12)

# Where an integer is expected (with its allowed range), in the spec proper.
_INT_FIELDS = {
    ("model", "seed"): (None, None), ("plan", "microbatches"): (1, 8), ("plan", "batch_size"): (1, None),
    ("plan", "attention", "replicas"): (1, None), ("plan", "experts", "nodes"): (1, None),
    ("plan", "experts", "tp"): (1, None), ("runtime", "buffer_bytes"): (4096, None),
    ("runtime", "max_step_tokens"): (1, None), ("workload", "input_len"): (1, None),
}
_FLOAT_FIELDS = {("runtime", "timeout_s"): 0.0, ("workload", "tpot_ms"): 0.0}
_ALL_PATHS = list(_INT_FIELDS) + list(_FLOAT_FIELDS) + [
    ("model",), ("model", "config"), ("model", "dtype"), ("model", "path"), ("device",), ("plan",),
    ("plan", "experts"), ("passes",), ("runtime",), ("runtime", "transport"), ("runtime", "delay_ms"),
    ("hardware",), ("workload",), ("planner",), ("runtime", "kv_cache"),
]
# Sizes of the tiny Mixtral that must be positive integers.
_CONFIG_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


def _set(d: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[path[-1]] = value


@st.composite
def mutated_specs(draw) -> tuple[dict, bool]:
    """A valid tiny spec with 1-3 mutations; returns (spec, whether some mutation makes it invalid)."""
    spec = tiny_spec_dict()
    if draw(st.booleans()):
        family = draw(st.sampled_from(sorted(FAMILIES)))
        spec["model"]["config"] = dict(FAMILIES[family])
    must_fail = False
    kinds = draw(st.lists(st.sampled_from(["int_type", "int_range", "float_type", "junk", "delete", "extra",
                                           "config_size", "config_junk", "top_k", "heads"]), min_size=1, max_size=3))
    # NOTE: the neutral mutations first: one applied after an invalidating one could undo it
    kinds.sort(key=lambda k: k not in ("junk", "delete", "config_junk"))
    for kind in kinds:
        model = spec.get("model")
        cfg = model.get("config") if isinstance(model, dict) else None
        if kind in ("config_size", "config_junk", "top_k", "heads") and not isinstance(cfg, dict):
            continue
        if kind == "int_type":  # a bool, a numeric string or a float where an integer is expected
            path = draw(st.sampled_from(sorted(_INT_FIELDS)))
            _set(spec, path, draw(st.one_of(st.booleans(), st.integers(0, 99).map(str), st.floats(0.5, 9.5))))
            must_fail = True
        elif kind == "int_range":
            path = draw(st.sampled_from(sorted(_INT_FIELDS)))
            lo, hi = _INT_FIELDS[path]
            if lo is None:
                continue
            _set(spec, path, draw(st.integers(-(2**40), lo - 1) | (st.integers(hi + 1, 2**40) if hi else st.nothing())))
            must_fail = True
        elif kind == "float_type":  # a string, a bool, a non-finite or a non-positive number for a positive float
            path = draw(st.sampled_from(sorted(_FLOAT_FIELDS)))
            _set(spec, path, draw(st.one_of(st.booleans(), st.text(max_size=5), st.sampled_from([math.inf, -math.inf, math.nan]),
                                            st.floats(max_value=0.0, allow_nan=False))))
            must_fail = True
        elif kind == "junk":
            _set(spec, draw(st.sampled_from(_ALL_PATHS)), draw(_JUNK))
        elif kind == "delete":
            path = draw(st.sampled_from(_ALL_PATHS))
            parent = spec
            for k in path[:-1]:
                parent = parent.get(k) if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
                must_fail |= path in (("model",), ("model", "config"))
        elif kind == "extra":  # a key no spec section has
            where = draw(st.sampled_from([(), ("model",), ("plan",), ("plan", "experts"), ("runtime",), ("workload",)]))
            _set(spec, where + ("x_" + draw(st.text("abcdefghij_", min_size=1, max_size=8)),), draw(_JUNK))
            must_fail = True
        elif kind == "config_size":  # zero, negative or non-integer model sizes
            if cfg.get("model_type") != "mixtral":
                continue
            cfg[draw(st.sampled_from(_CONFIG_SIZES))] = draw(st.one_of(st.integers(-(2**31), 0), st.booleans(),
                                                                        st.text(max_size=4), st.floats(0.5, 99.5)))
            must_fail = True
        elif kind == "config_junk":  # any key of the model config, any value
            cfg[draw(st.sampled_from(sorted(cfg) + ["rope_parameters", "eos_token_id", "hidden_act", "layer_types",
                                                    "attribute_map", "to_dict", "__class__", "tie_word_embeddings"]))] = draw(_JUNK)
        elif kind == "top_k":
            if cfg.get("model_type") != "mixtral":
                continue
            experts = draw(st.integers(1, 8))
            cfg.update(num_local_experts=experts, num_experts_per_tok=draw(st.integers(experts + 1, 64)))
            must_fail = True
        elif kind == "heads":  # a hidden size the heads do not divide, or kv heads that do not divide the heads
            if cfg.get("model_type") != "mixtral":
                continue
            heads = draw(st.integers(2, 16))
            if draw(st.booleans()):
                cfg.update(num_attention_heads=heads, num_key_value_heads=1,
                           hidden_size=heads * draw(st.integers(1, 8)) + draw(st.integers(1, heads - 1)))
            else:
                kv = draw(st.integers(2, 16).filter(lambda k: heads % k))
                cfg.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * 8)
            must_fail = True
    return spec, must_fail


def _alias_graph(fanout: int, levels: int, container: str) -> str:
    """A YAML alias chain under `planner:` expanding to fanout**levels values (a "billion laughs" when large)."""
    lines = ["model:", "  config: {model_type: mixtral}", "planner:"]
    lines.append(f"  l0: &l0 " + ("[" + ", ".join(["lol"] * fanout) + "]" if container == "list"
                                   else "{" + ", ".join(f"k{i}: lol" for i in range(fanout)) + "}"))
    for n in range(1, levels):
        items = [f"*l{n - 1}"] * fanout
        body = "[" + ", ".join(items) + "]" if container == "list" else "{" + ", ".join(f"k{i}: {x}" for i, x in enumerate(items)) + "}"
        lines.append(f"  l{n}: &l{n} {body}")
    return "\n".join(lines) + "\n"


def _level_values(fanout: int, level: int, container: str) -> int:
    """Values (nodes) level `level` of _alias_graph expands to, counted independently of msc: each level is
    a list of `fanout` items (or a mapping of `fanout` key/value pairs) of the level below."""
    size = 1 + fanout * (1 if container == "list" else 2)  # l0: the container and its scalars (and keys)
    for _ in range(level):
        size = 1 + fanout * (size if container == "list" else 1 + size)
    return size


def _expanded_values(fanout: int, levels: int, container: str) -> int:
    """Values the whole document of _alias_graph expands to: the root mapping, `model` (key, mapping, and
    config's key, mapping, model_type key and value) and `planner` (key, mapping, a key and a value per level)."""
    return 1 + 6 + 2 + sum(1 + _level_values(fanout, n, container) for n in range(levels))


# ------------------------------------------------------------------------------------------------ fuzz tests
@FUZZ
@given(mutated_specs())
def test_fuzz_mutated_specs(case):
    spec, must_fail = case
    _run_case(yaml.safe_dump(spec, allow_unicode=True), must_fail)


@settings(FUZZ, max_examples=150)
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=60).map(lambda b: DEFAULT_SPEC_YAML.encode()[:200] + b)))
def test_fuzz_garbage_bytes(content):
    _run_case(content)


@settings(FUZZ, max_examples=150)
@given(st.text(alphabet=st.sampled_from(list("model:config{}[]&*!|>-?,'\"#%@` \n\t\\x0123abc") + ["\x00", "\u2028", "\ufeff", "é"]),
               max_size=200),
       st.integers(0, len(DEFAULT_SPEC_YAML)))
def test_fuzz_yaml_text(junk, at):
    """Junk spliced into the default spec's text, or alone."""
    _run_case(DEFAULT_SPEC_YAML[:at] + junk + DEFAULT_SPEC_YAML[at:])
    _run_case(junk)


@settings(FUZZ, max_examples=60)
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(["list", "map"]))
def test_fuzz_alias_graphs(fanout, levels, container):
    """Aliases expanding within the bound load; beyond it they are refused, in time, whatever the size."""
    error = _run_case(_alias_graph(fanout, levels, container))
    too_big = _expanded_values(fanout, levels, container) > MAX_EXPANDED_VALUES
    assert (error is not None) == too_big, (fanout, levels, container, error)
    if too_big:
        assert "aliases" in str(error)


@settings(FUZZ, max_examples=40)
@given(st.integers(1, 3000), st.sampled_from(["flow_list", "flow_map", "block"]))
def test_fuzz_nesting(depth, style):
    """Nesting within MAX_DEPTH loads, deeper is refused (one line) however deep."""
    if style == "flow_list":
        value, levels = "[" * depth + "1" + "]" * depth, depth + 1
    elif style == "flow_map":
        value, levels = "{a: " * depth + "1" + "}" * depth, depth + 1
    else:
        depth = min(depth, 300)  # block indentation grows as depth squared
        value = "\n" + "".join("  " * (i + 2) + "a:\n" for i in range(depth)) + "  " * (depth + 2) + "b: 1"
        levels = depth + 2
    error = _run_case(f"model:\n  config: {{model_type: mixtral}}\nplanner:\n  deep: {value}\n")
    # levels of the document: its mapping, planner's mapping, then deep's value with `levels` levels
    assert (error is not None) == (2 + levels > MAX_DEPTH), (depth, style, error)
    if error is not None:
        assert "nests deeper" in str(error)


# ------------------------------------------------------------------------------------------------ explicit cases
def _write(tmp_path, content: str | bytes) -> Path:
    path = tmp_path / "model.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _fails(path: Path) -> str:
    with pytest.raises(MscError) as info:
        _load_and_check(path)
    msg = str(info.value)
    _assert_one_clear_line(msg, str(path))
    return msg


def test_alias_bomb_is_refused_in_time(tmp_path):
    text = _alias_graph(9, 9, "list")  # under 400 bytes, about 4 * 10**8 values expanded
    assert len(text) < 1024 and _expanded_values(9, 9, "list") > 3 * 10**8
    path = _write(tmp_path, text)
    t0 = time.perf_counter()
    msg = _fails(path)
    assert time.perf_counter() - t0 < CASE_SECONDS
    # the message names the first level that crosses the bound (counted independently above)
    first = next(n for n in range(9) if _level_values(9, n, "list") > MAX_EXPANDED_VALUES)
    line = next(i + 1 for i, text_line in enumerate(text.splitlines()) if text_line.startswith(f"  l{first}:"))
    assert msg.startswith(f"{path}:{line}: the YAML aliases here expand to more than {MAX_EXPANDED_VALUES} values"), msg


def test_recursive_alias_is_refused(tmp_path):
    msg = _fails(_write(tmp_path, "model:\n  config: {model_type: mixtral}\nplanner: &a\n  self: *a\n"))
    assert "refers to the block that contains it" in msg


def test_aliases_and_merge_keys_within_bounds_still_work(tmp_path):
    text = ("model:\n  config: {model_type: mixtral, vocab_size: 256, hidden_size: 64, num_attention_heads: 4,\n"
            "           num_key_value_heads: 2, num_local_experts: 4, num_experts_per_tok: 2}\n"
            "hardware:\n  attention: &pool {gpu: H100, count: 4}\n  experts: *pool\n"
            "planner:\n  base: &base {a: 1, b: 2}\n  derived: {<<: *base, b: 3}\n")
    spec = _load_and_check(_write(tmp_path, text))
    assert spec.hardware.attention == spec.hardware.experts and spec.hardware.experts.count == 4
    assert spec.planner["derived"] == {"a": 1, "b": 3}  # a merge key may be overridden: not a duplicate


@pytest.mark.parametrize("text, key", [
    ("model:\n  config: {model_type: mixtral}\ndevice: cpu\ndevice: meta\n", "device"),
    ("model:\n  config: {model_type: mixtral}\nplan:\n  microbatches: 2\n  batch_size: 4\n  microbatches: 3\n", "microbatches"),
    ("model:\n  config: {model_type: mixtral,\n           vocab_size: 256,\n           vocab_size: 512}\n", "vocab_size"),
])
def test_duplicate_keys_are_refused_with_their_line(tmp_path, text, key):
    path = _write(tmp_path, text)
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if re.search(rf"\b{key}:", line)]
    assert len(lines) == 2
    assert _fails(path).startswith(f"{path}:{lines[1]}: duplicate key '{key}' (first at line {lines[0]})")


@pytest.mark.parametrize("value", ["true", "false", '"8"', "'3'", "2.0"])
def test_microbatches_must_be_an_integer(tmp_path, value):
    text = f"model:\n  config: {{model_type: mixtral}}\nplan:\n  microbatches: {value}\n"
    assert _fails(_write(tmp_path, text)).startswith(f"{tmp_path / 'model.yaml'}:4: key 'plan.microbatches'")


def test_strict_types_keep_ints_for_floats_and_literals(tmp_path):
    text = ("model:\n  config: {model_type: mixtral}\n  dtype: bfloat16\ndevice: meta\n"
            "runtime: {timeout_s: 5, transport: tcp, delay_ms: {attention: 2}}\nworkload: {tpot_ms: 100}\n")
    spec = load_spec(_write(tmp_path, text))
    assert spec.runtime.timeout_s == 5.0 and isinstance(spec.runtime.timeout_s, float)
    assert (spec.model.dtype, spec.device, spec.runtime.transport) == ("bfloat16", "meta", "tcp")
    assert _fails(_write(tmp_path, text.replace("tpot_ms: 100", "tpot_ms: '100'"))).startswith(f"{tmp_path / 'model.yaml'}:6: key 'workload.tpot_ms'")
    assert "key 'device'" in _fails(_write(tmp_path, text.replace("device: meta", "device: tpu")))


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    msg = _fails(_write(tmp_path, b"model:\n  config: {model_type: mixtral}\n\x00\x01\x02"))
    assert msg.startswith(f"{tmp_path / 'model.yaml'}:3:") and "binary" in msg
    msg = _fails(_write(tmp_path, b"model:\n  config: {model_type: \xff\xfe}\n"))
    assert msg.startswith(f"{tmp_path / 'model.yaml'}:2:") and "UTF-8" in msg


def test_large_file_is_refused(tmp_path):
    from msc.spec import MAX_SPEC_BYTES

    msg = _fails(_write(tmp_path, "model:\n  config: {model_type: mixtral}\n" + "#" * MAX_SPEC_BYTES + "\n"))
    assert "larger than" in msg


@pytest.mark.parametrize("style", ["[", "{a: ", "block"])
def test_deep_nesting_is_refused(tmp_path, style):
    depth = 100_000 if style != "block" else 200
    body = (style * depth if style != "block" else "\n" + "".join(" " * (i + 1) + "a:\n" for i in range(depth)))
    msg = _fails(_write(tmp_path, "model:\n  config: {model_type: mixtral}\nplanner: " + body + "\n"))
    assert "nests deeper" in msg


def _config_spec(tmp_path, **config) -> Path:
    spec = tiny_spec_dict()
    spec["model"]["config"].update(config)
    return _write(tmp_path, yaml.safe_dump(spec))


@pytest.mark.parametrize("config, expected", [
    ({"num_local_experts": 2, "num_experts_per_tok": 4}, "model.config.num_experts_per_tok: top-k 4 is larger than the expert count 2"),
    ({"hidden_size": 65}, "model.config.hidden_size: 65 is not divisible by the 4 attention heads"),
    ({"num_key_value_heads": 3}, "model.config.num_key_value_heads: 3 key/value heads do not divide the 4"),
    ({"num_local_experts": 0}, "model.config.num_local_experts: an MoE model needs at least 1 expert"),
    ({"vocab_size": -5}, "model.config.vocab_size: expected a positive integer, got -5"),
    ({"num_hidden_layers": 0}, "model.config.num_hidden_layers: expected a positive integer, got 0"),
    ({"vocab_size": "many"}, "model.config.vocab_size: expected a positive integer, got 'many'"),
    ({"hidden_act": 3}, "model.config.hidden_act: transformers rejected it"),
    ({"layer_types": 3}, "model.config.layer_types: transformers rejected 3"),
    ({"model_type": "no_such_family"}, "model.config.model_type: transformers knows no model type 'no_such_family'"),
    ({"to_dict": 1}, "model.config.to_dict: not a setting"),
])
def test_model_config_errors_are_one_line_naming_the_key(tmp_path, config, expected):
    assert _fails(_config_spec(tmp_path, **config)).startswith(expected)


@pytest.mark.parametrize("family, config, key", [
    ("qwen3_moe", {"num_experts": 6, "num_experts_per_tok": 7}, "num_experts_per_tok"),
    ("qwen2_moe", {"num_experts": 0}, "num_experts"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("deepseek_v3", {"n_routed_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("deepseek_v3", {"n_routed_experts": 8, "n_group": 3}, "n_group"),
    ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("dbrx", {"ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 5}}, "ffn_config.moe_top_k"),
    ("dbrx", {"d_model": 66}, "d_model"),
    ("dbrx", {"attn_config": {"kv_n_heads": 3, "clip_qkv": 8.0, "rope_theta": 10000.0}}, "attn_config.kv_n_heads"),
])
def test_family_config_errors_name_the_family_key(tmp_path, family, config, key):
    spec = {"model": {"config": {**FAMILIES[family], **config}}, "device": "meta"}
    assert _fails(_write(tmp_path, yaml.safe_dump(spec))).startswith(f"model.config.{key}: ")


def test_examples_the_default_spec_and_the_tested_families_still_load():
    examples = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "examples" / "*.yaml")))
    assert examples
    for path in examples:
        spec = _load_and_check(Path(path))
        assert spec.model is not None
    spec = default_spec()
    assert load_hf_config(spec).num_local_experts == 4
    for family, config in FAMILIES.items():
        assert load_hf_config(default_spec().model_copy(update={"model": spec.model.model_copy(update={"config": config})})).model_type == family
