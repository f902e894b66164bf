"""pipeline_microbatches: stages of each role program, and running them ping-pong keeps micro-batches apart."""
import pytest
import torch

from msc.errors import MscError
from msc.ir import graph_meta
from msc.ops import is_op
from msc.runtime import context
from msc.runtime.staged import StagedProgram, ping_pong, split_microbatches
from tests.passes.helpers import run_passes

PIPE = ["annotate_roles", "split_roles", "place_experts", "insert_dispatch_combine", "lower_roles", "pipeline_microbatches"]
BOUNDS = [0, 2, 4]


def _stage(n):
    return n.meta["msc"]["stage"]


def test_attention_stages_end_with_a_dispatch_and_open_with_its_combine(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE)
    att = graph_meta(gm)["programs"]["attention"].gm
    dispatch = {n.args[3]: n for n in att.graph.nodes if is_op(n, "dispatch")}
    combine = {n.args[2]: n for n in att.graph.nodes if is_op(n, "combine")}
    assert {l: _stage(n) for l, n in dispatch.items()} == {0: 0, 1: 1}
    assert {l: _stage(n) for l, n in combine.items()} == {0: 1, 1: 2}
    # nothing computed from a combine's result can run in an earlier stage than the combine
    for n in att.graph.nodes:
        if n.op == "call_function":
            assert all(_stage(n) >= _stage(a) for a in n.all_input_nodes if a.op == "call_function")
    assert graph_meta(gm)["pipeline"]["stages"] == {"attention": 3, "expert.0": 2, "expert.1": 2}


def test_expert_stage_k_holds_exactly_layer_k_recv_experts_send(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE)
    exp = graph_meta(gm)["programs"]["expert.1"].gm
    by_stage = {}
    for n in exp.graph.nodes:
        for name in ("expert_recv", "experts", "expert_send"):
            if is_op(n, name):
                by_stage.setdefault(_stage(n), []).append((name, n.meta["msc"]["layer"]))
    assert by_stage == {k: [("expert_recv", k), ("experts", k), ("expert_send", k)] for k in range(2)}


def test_ping_pong_runs_every_microbatch_through_a_stage_before_the_next_stage():
    assert ping_pong(3, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert ping_pong(2, 1) == [(0, 0), (1, 0)]


@pytest.mark.parametrize("lengths,m", [([1] * 7, 3), ([5, 2, 8, 3, 3], 2), ([4, 4], 4), ([9], 3), ([1, 1, 1, 30, 1, 1], 3)])
def test_split_microbatches_is_contiguous_non_empty_and_balanced(lengths, m):
    groups = split_microbatches(lengths, m)
    assert len(groups) == min(m, len(lengths))
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every sequence once, in order
    assert all(len(g) > 0 for g in groups)
    tokens = [sum(lengths[i] for i in g) for g in groups]
    assert max(tokens) <= sum(lengths) / len(groups) + max(lengths)


class MicrobatchPeers:
    """In-process experts for the attention program; results are kept per (layer, micro-batch), as the
    runtime's tags keep them. `mb` is set by the driver before each stage."""

    def __init__(self, toy):
        self.toy, self.mb, self.out = toy, 0, {}
        self.order = []

    def dispatch(self, hidden, idx, w, layer, bounds):
        self.order.append(("dispatch", layer, self.mb))
        y = torch.ops.msc.experts(hidden, idx, w, self.toy.gate_up[layer], self.toy.down[layer], layer, 0)  # [T, H]
        self.out[(layer, self.mb)] = y
        return torch.tensor([layer])

    def combine(self, ticket, hidden, layer):
        self.order.append(("combine", layer, self.mb))
        return self.out.pop((layer, self.mb))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_staged_attention_program_run_ping_pong_equals_the_model(toy, toy_gm, m):
    x = torch.randn(7, 8)  # [T, H]
    want = toy(x)  # [T, H]
    gm, _ = run_passes(toy_gm, PIPE)
    prog = StagedProgram(graph_meta(gm)["programs"]["attention"].gm)
    groups = split_microbatches([1] * 7, m)
    envs = [prog.start(x[g.start : g.stop]) for g in groups]
    peers = MicrobatchPeers(toy)
    with context.use(peers), torch.no_grad():
        for stage, mb in ping_pong(prog.num_stages, len(groups)):
            peers.mb = mb
            prog.run_stage(stage, envs[mb])
    got = torch.cat([prog.output(env) for env in envs])  # [T, H]
    assert torch.allclose(got, want, atol=1e-5)
    # micro-batch 1 dispatches layer 0 before micro-batch 0 combines it: the overlap the pipeline is for
    if m > 1:
        assert peers.order.index(("dispatch", 0, 1)) < peers.order.index(("combine", 0, 0))


def test_program_without_stages_is_refused_with_the_fix(toy_gm):
    gm, _ = run_passes(toy_gm, PIPE[:-1])
    with pytest.raises(MscError, match="pipeline_microbatches pass"):
        StagedProgram(graph_meta(gm)["programs"]["attention"].gm)


def test_the_pass_needs_lowered_programs(toy_gm):
    with pytest.raises(MscError, match="needs pass 'lower_roles'"):
        run_passes(toy_gm, ["annotate_roles", "split_roles", "pipeline_microbatches"])
