"""State layers' per-sequence bytes (issue 26): the runtime's state slots, the planner's cost model and the
config's sizes agree, and the planner's memory model counts them per sequence."""
from __future__ import annotations

import pytest

from msc.compiler import compile_spec
from msc.engine import build
from msc.engine.build import build_engine
from msc.errors import MscError
from msc.planner.cost import cost_of_spec
from msc.planner.search import Workload, attention_memory
from msc.spec import parse_spec
from tests.models.families import STATE_FAMILIES


def test_qwen3_next_state_bytes_agree_with_the_config(tmp_path):
    cfg = STATE_FAMILIES["qwen3_next"]
    spec = {"model": {"config": cfg, "seed": 0, "dtype": "float32"}, "device": "cpu", "plan": {"experts": {"nodes": 2}}}
    bundle = compile_spec(parse_spec(spec), tmp_path / "b")
    hk, hv, dk, dv = (cfg[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                         "linear_value_head_dim"))
    conv = (2 * hk * dk + hv * dv) * (cfg["linear_conv_kernel_dim"] - 1) * 4  # last K - 1 inputs of q, k, v (float32)
    recurrent = hv * dk * dv * 4  # S [Hv, dk, dv] in float32
    per_seq = cfg["layer_types"].count("linear_attention") * (conv + recurrent)
    eng = build_engine(bundle.manifest, bundle.load_program(bundle.manifest["colocated"]["program"], "cpu"), "cpu")
    assert eng.runner.state_bytes_per_sequence() == per_seq
    states = eng.scheduler.cache.states
    assert states.bytes_per_sequence == per_seq and states.num_slots == bundle.manifest["plan"]["batch_size"] + 1
    cost, _ = cost_of_spec(parse_spec(spec))
    assert cost.state_bytes_per_seq() == per_seq
    wl = Workload(input_len=10, output_len=10)
    grown = attention_memory(cost, 8, 1, 2, wl) - attention_memory(cost, 4, 1, 2, wl)
    kv_and_act = 4 * (wl.max_context * cost.kv_bytes_tp(2) + cost.hidden_size * cost.dtype_bytes * 16) / 2
    assert abs(grown - kv_and_act - 4 * per_seq) < 1e-6  # 4 more sequences: each GPU of tp 2 keeps their whole state


def test_the_state_slots_come_out_of_the_default_kv_budget(tmp_path, monkeypatch):
    """On the default budget (CPU_KV_BYTES here) the KV cache gets what the batch's state slots leave; a batch whose
    states take it all is a clear error, not an out-of-memory later."""
    cfg = STATE_FAMILIES["qwen3_next"]
    spec = {"model": {"config": cfg, "seed": 0, "dtype": "float32"}, "device": "cpu", "plan": {"experts": {"nodes": 2},
                                                                                           "batch_size": 8}}
    bundle = compile_spec(parse_spec(spec), tmp_path / "b")
    program = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    eng = build_engine(bundle.manifest, program, "cpu")
    per_token, per_seq = eng.runner.kv_bytes_per_token(), eng.runner.state_bytes_per_sequence()
    budget = 9 * per_seq + 300 * per_token  # 9 slots (8 + scratch) and 300 tokens of pages
    monkeypatch.setattr(build, "CPU_KV_BYTES", budget)
    sizes = build.engine_sizes(bundle.manifest, eng.runner)
    assert sizes["kv_tokens"] == min(8 * sizes["max_seq_len"], 300)
    monkeypatch.setattr(build, "CPU_KV_BYTES", 9 * per_seq)  # states take it all
    with pytest.raises(MscError, match="state layers' .* leave the KV cache 0 tokens"):
        build.engine_sizes(bundle.manifest, eng.runner)
