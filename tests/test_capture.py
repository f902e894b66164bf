"""Capture of the tiny Mixtral: one node per MoE boundary, shape-generic, equal to the HF forward."""
import pytest
import torch
from transformers import AutoConfig

from msc.capture import capture
from msc.ir import bind_device, fetch_attr, get_attr_targets
from msc.models import adapter_for
from msc.ops import is_op
from msc.runtime import context
from msc.runtime.paged_kv import PagedKVCache, StepMeta, paged_attention
from tests.conftest import TINY


@pytest.fixture(scope="module")
def captured():
    cfg = dict(TINY)
    return capture(AutoConfig.for_model(cfg.pop("model_type"), **cfg), adapter_for("mixtral"))


def test_one_node_per_moe_boundary(captured):
    nodes = list(captured.gm.graph.nodes)
    for op in ("attention", "router", "experts"):
        layers = [n.meta["msc"]["layer"] for n in nodes if is_op(n, op)]
        assert layers == [0, 1], op
    assert all(fetch_attr(captured.gm, t).device.type == "meta" for t in get_attr_targets(captured.gm.graph)
               if t not in captured.constants)


class _Colocated:
    """Runs attention over a fresh KV cache for one packed step (no peers: experts run in place)."""

    def __init__(self, lengths):
        self.lengths, self.cache, self.meta = lengths, None, None

    def attention(self, q, k, v, layer, scaling, window, sinks=None):
        if self.cache is None:  # made at the first call, once the head shapes are known
            self.cache = PagedKVCache(2, 16, 4, k.shape[1], k.shape[3], v.shape[3], k.dtype, "cpu", 32)
            for s in range(len(self.lengths)):
                self.cache.add_sequence(s)
            self.meta = StepMeta.for_prefill(self.cache, list(range(len(self.lengths))), self.lengths)
        return paged_attention(self.cache, layer, q, k, v, self.meta, scaling, window, sinks)


@pytest.mark.parametrize("lengths", [[3], [9], [4, 1, 6]])
def test_captured_graph_runs_at_any_length_and_matches_hf(captured, tiny_hf, lengths):
    gm = bind_device(captured.gm, "cpu")
    state = dict(tiny_hf.state_dict())
    for t in get_attr_targets(gm.graph):
        parent, _, leaf = t.rpartition(".")
        value = captured.constants[t] if t in captured.constants else state[t]
        setattr(gm.get_submodule(parent) if parent else gm, leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)) for n in lengths]
    ids = torch.cat(prompts)[None]  # [1, T]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    with context.use(_Colocated(lengths)), torch.no_grad():
        (logits,) = gm(ids, pos)  # [1, T, V]
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = tiny_hf(p[None]).logits[0]
        assert (logits[0, start : start + len(p)] - ref).abs().max() < 1e-4
        start += len(p)
