"""Families with state layers (issue 26) beside attention: Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE), Mamba-2
(Granite-4 hybrid), Mamba (Jamba), Kimi delta attention (Kimi-Linear: a per-channel decay, beside MLA).

Each tiny config compiles with 2 expert nodes; as role processes its greedy tokens equal transformers' and its
logits are within 1e-4 of the model's forward; on the colocated engine, prompts arriving while others decode,
chunked under a small token budget and preempted under a small KV pool, still get transformers' tokens (the
per-sequence state goes and comes back with the sequence). A state layer msc does not implement is refused at
compile time, naming the module.
"""
from __future__ import annotations

import pytest
import torch

from msc.compiler import compile_spec
from msc.engine.engine import Engine
from msc.engine.request import SamplingParams
from msc.engine.runner import ModelRunner
from msc.errors import MscError
from msc.ops import is_attention, is_state_op
from msc.spec import parse_spec
from msc.verify import reference_generate, verify_bundle
from tests.models.families import RUNNING_STATE_FAMILIES, STATE_FAMILIES

PROMPTS = [[5, 17, 42], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [9], [200, 100, 50, 25, 3, 1, 4, 1, 5]]
TESTED = sorted(RUNNING_STATE_FAMILIES)


def _spec(config: dict, **plan):
    return parse_spec({"model": {"config": config, "seed": 0, "dtype": "float32"}, "device": "cpu",
                       "plan": {"experts": {"nodes": 2}, **plan}})


@pytest.fixture(scope="module", params=TESTED)
def bundle(request, tmp_path_factory):
    return compile_spec(_spec(STATE_FAMILIES[request.param]), tmp_path_factory.mktemp(request.param) / "b")


def test_role_processes_match_transformers(bundle):
    from transformers import AutoConfig

    from msc.capture import _LAYER_ARG

    config = AutoConfig.from_pretrained(str(bundle.checkpoint_dir()))
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    state_layers = sorted({n.args[_LAYER_ARG[n.target.__name__.split(".")[0]]] for n in gm.graph.nodes if is_state_op(n)})
    attention_layers = sorted(n.args[_LAYER_ARG[n.target.__name__.split(".")[0]]] for n in gm.graph.nodes if is_attention(n))
    assert state_layers and attention_layers
    assert not set(state_layers) & set(attention_layers)  # a layer mixes tokens one way
    assert set(state_layers) | set(attention_layers) <= set(range(config.num_hidden_layers))  # (Nemotron-H: MoE-only layers)
    r = verify_bundle(bundle.path, None, 8)
    assert r["outputs"] == r["reference_outputs"]
    assert r["max_abs_logit_err"] < 1e-4


def test_colocated_engine_with_chunks_and_preemption_matches_transformers(bundle, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    gm = bundle.load_program(bundle.manifest["colocated"]["program"], "cpu")
    eng = Engine(ModelRunner(gm, bundle.manifest["model"]["num_hidden_layers"], "cpu", max_batch=4), [-1],
                 vocab_size=256, max_batch=4, max_step_tokens=8, max_seq_len=64, kv_tokens=64)
    reqs = eng.generate(PROMPTS, SamplingParams(max_tokens=16), arrivals=[0, 0, 1, 2, 3])
    assert [r.output for r in reqs] == [reference_generate(hf, p, 16) for p in PROMPTS]
    assert any(r.preempted for r in eng.records), "the small pool was meant to preempt"
    assert any(len(r.prefill) and r.decode for r in eng.records), "no step mixed prompt chunks and decodes"
    states = eng.scheduler.cache.states
    assert states is not None and len(states._free) == states.num_slots - 1  # every slot back


def test_unknown_state_layer_is_refused_naming_it(tmp_path):
    # ZAYA's attention projects through depthwise convolutions over past tokens, a state msc does not implement
    spec = parse_spec({"model": {"config": {"model_type": "zaya", "num_hidden_layers": 2, "num_experts_per_tok": 1}},
                       "device": "meta", "plan": {"experts": {"nodes": 2}}})
    with pytest.raises(MscError, match=r"model\.layers\.0\.self_attn\.qkv_proj \(ZayaCCAProjection\) holds a depthwise"):
        compile_spec(spec, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_replicas_and_microbatches_keep_the_states_apart(tmp_path):
    """2 attention replicas, 2 micro-batches going ping-pong, experts tp 2: each micro-batch's sequences read and
    write their own state slots. (Attention tp is refused for Qwen3-Next: its attention output is gated before
    o_proj, which shard_tensor_parallel does not split.)"""
    from transformers import AutoModelForCausalLM

    from msc.runtime.launcher import run_bundle

    spec = parse_spec({"model": {"config": RUNNING_STATE_FAMILIES["qwen3_next"], "seed": 0, "dtype": "float32"},
                       "device": "cpu", "plan": {"experts": {"nodes": 2, "tp": 2}, "attention": {"replicas": 2},
                                                 "microbatches": 2}})
    bundle = compile_spec(spec, tmp_path / "b")
    hf = AutoModelForCausalLM.from_pretrained(str(bundle.checkpoint_dir())).eval()
    res = run_bundle(bundle.path, PROMPTS, 6, arrivals=[0, 0, 2, 3, 3])
    assert res["outputs"] == [reference_generate(hf, p, 6) for p in PROMPTS]
