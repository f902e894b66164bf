"""MLA's KV bytes per token (issues 21 and 22): the runtime's latent cache, the planner's cost model and the
config's kv_lora_rank + qk_rope_head_dim agree, and a full-size DeepSeek-V3 plan's batch is sized by them."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from msc.engine.build import build_engine
from msc.planner.cost import cost_of_spec
from msc.planner.plan_spec import plan_spec
from msc.planner.search import attention_memory
from msc.spec import parse_spec
from tests.models.families import FAMILIES

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_deepseek_v3_cache_planner_and_config_agree_on_the_latent_bytes(family_bundle):
    spec, bundle, _ = family_bundle("deepseek_v3")
    cfg = FAMILIES["deepseek_v3"]
    latent = cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4  # float32
    program = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    eng = build_engine(bundle.manifest, program, "cpu")
    assert eng.runner.kv_bytes_per_token() == latent
    cache = eng.scheduler.cache
    assert cache.k.untyped_storage().nbytes() == (eng.num_pages + 1) * cache.page_size * latent  # nothing else stored
    cost, _ = cost_of_spec(parse_spec(spec))
    assert cost.kv_bytes_per_token() == latent
    # the expanded heads it replaces: nh x (dn + dr + dv) values a layer
    expanded = cfg["num_hidden_layers"] * cfg["num_attention_heads"] * (
        cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"] + cfg["v_head_dim"]) * 4
    assert latent * 4 < expanded


def test_a_full_size_deepseek_v3_plan_is_sized_by_the_latent_cache(tmp_path):
    d = yaml.safe_load((EXAMPLES / "deepseek-v3-meta.yaml").read_text())
    d.pop("plan")
    d["hardware"] = {"pool": {"gpu": "H200", "count": 64, "per_node": 8}}
    d["workload"] = {"input_len": 571, "output_len": 159, "tpot_ms": 150}
    c = d["model"]["config"]
    report = plan_spec(parse_spec(copy.deepcopy(d)), top=1)
    cost = report.cost
    assert cost.kv_bytes_per_token() == c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2  # 70,272
    best = report.result.plans[0]
    wl = report.planner.wl
    gpu_bytes = report.planner.att_pool.gpu.mem_bytes
    used = attention_memory(cost, best.b_a, best.m, best.tp_a, wl)
    assert used <= gpu_bytes
    # the same batch in the expanded cache (128 heads x (192 + 128) values a layer, 71x more) would not fit
    per_seq_expanded = wl.max_context * c["num_hidden_layers"] * c["num_attention_heads"] * (192 + 128) * 2
    assert best.b_a * best.m * per_seq_expanded / best.tp_a > gpu_bytes
