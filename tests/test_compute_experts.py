"""backends/compute/torch_eager.py against independent float64 references.

The reference below is written per token and per top-k slot with explicit loops, from the canonical
weights (gate rows then up rows, [2I, H]; down [H, I]), and its activations from their textbook formulas.
The code under test gets the same weights in the storage order a layout flag names, so both the layout
decoding and the arithmetic are checked. transformers' own experts modules (Mixtral, Qwen3-MoE, GPT-OSS)
are a second reference, with the (act, layout) that `describe_experts` derives for them.
"""
from __future__ import annotations

import math

import pytest
import torch

from msc.backends.compute.torch_eager import (
    gated_experts,
    gated_experts_static,
    parse_activation,
    parse_layout,
    softmax_topk_router,
    swiglu_experts,
)
from msc.errors import MscError
from msc.models.base import describe_experts

F64 = torch.float64
T, H, I, E, K = 7, 12, 10, 4, 2


# ------------------------------------------------------------------------------------------ references
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _ref_act(act: str):
    """Scalar gate functions g(gate, up), written from the formulas (not from torch.nn.functional)."""
    if act.startswith("gpt_oss:"):
        _, alpha, limit = act.split(":")
        alpha, limit = float(alpha), float(limit)

        def gpt_oss(g, u):
            g = min(g, limit)  # gate clamped from above only
            u = max(-limit, min(u, limit))  # up clamped on both sides
            return (u + 1.0) * g * _sigmoid(alpha * g)

        return gpt_oss
    plain = {
        "silu": lambda g: g * _sigmoid(g),
        "gelu": lambda g: 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))),
        "gelu_pytorch_tanh": lambda g: 0.5 * g * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3))),
        "relu": lambda g: max(g, 0.0),
    }[act]
    return lambda g, u: plain(g) * u


def ref_experts(hidden, index, weights, gate_up, down, first_expert=0, gate_up_bias=None, down_bias=None, act="silu"):
    """float64, canonical layout: gate_up [E_local, 2I, H] (gate rows 0..I-1, up rows I..2I-1), down [E_local, H, I].
    Ids outside [first_expert, first_expert + E_local) contribute nothing."""
    g = _ref_act(act)
    e_local, two_i, _ = gate_up.shape
    inter = two_i // 2
    n_tok, k_slots = index.shape
    out = torch.zeros(n_tok, hidden.shape[1], dtype=F64)
    for t in range(n_tok):
        x = hidden[t].to(F64)
        for k in range(k_slots):
            e = int(index[t, k]) - first_expert
            if not 0 <= e < e_local:
                continue
            gu = gate_up[e].to(F64) @ x
            if gate_up_bias is not None:
                gu = gu + gate_up_bias[e].to(F64)
            h = torch.tensor([g(float(gu[i]), float(gu[inter + i])) for i in range(inter)], dtype=F64)
            y = down[e].to(F64) @ h
            if down_bias is not None:
                y = y + down_bias[e].to(F64)
            out[t] += float(weights[t, k]) * y
    return out


def to_layout(gate_up, down, gate_up_bias, flags: set[str]):
    """Canonical weights -> the storage a layout names (built by explicit indexing, not by the code under test)."""
    gu, b = gate_up.clone(), None if gate_up_bias is None else gate_up_bias.clone()
    inter = gate_up.shape[1] // 2
    if "interleaved" in flags:
        gu = torch.empty_like(gate_up)
        for i in range(inter):
            gu[:, 2 * i] = gate_up[:, i]  # gate_i
            gu[:, 2 * i + 1] = gate_up[:, inter + i]  # up_i
        if gate_up_bias is not None:
            b = torch.empty_like(gate_up_bias)
            for i in range(inter):
                b[:, 2 * i], b[:, 2 * i + 1] = gate_up_bias[:, i], gate_up_bias[:, inter + i]
    if "gate_up_t" in flags:
        gu = gu.transpose(1, 2).contiguous()  # [E, H, 2I]
    dn = down.transpose(1, 2).contiguous() if "down_t" in flags else down.clone()  # [E, I, H]
    return gu, dn, b


def _problem(seed=0, n_tok=T, e=E, scale=0.4, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tok, H, generator=g, dtype=F64)
    gate_up = torch.randn(e, 2 * I, H, generator=g, dtype=F64) * scale
    down = torch.randn(e, H, I, generator=g, dtype=F64) * scale
    gub = torch.randn(e, 2 * I, generator=g, dtype=F64) * 0.3
    db = torch.randn(e, H, generator=g, dtype=F64) * 0.3
    # distinct experts per token (a random permutation's first K), weights positive, not normalised on purpose
    index = torch.stack([torch.randperm(e, generator=g)[:K] for _ in range(n_tok)]) if n_tok else torch.zeros(0, K, dtype=torch.int64)
    weights = torch.rand(n_tok, K, generator=g, dtype=F64) + 0.1
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(hidden), index, cast(weights), cast(gate_up), cast(down), cast(gub), cast(db)


# ------------------------------------------------------------------------------------------ activations
ACTS = ["silu", "gelu", "gelu_pytorch_tanh", "relu", "gpt_oss:1.702:7.0", "gpt_oss:1.702:0.6"]


@pytest.mark.parametrize("act", ACTS)
def test_activation_against_formula(act):
    h, idx, w, gu, dn, _, _ = _problem(seed=1, scale=0.8)
    got = gated_experts(h, idx, w, gu, dn, 0, act=act)
    torch.testing.assert_close(got, ref_experts(h, idx, w, gu, dn, act=act), rtol=1e-12, atol=1e-12)


def test_gpt_oss_clamp_is_exercised():
    """With limit 0.6 and these weights, gate and up both exceed the limit in places: the clamp matters,
    and (up + 1) * glu differs from the unclamped formula."""
    h, idx, w, gu, dn, _, _ = _problem(seed=1, scale=0.8)
    pre = torch.einsum("eih,th->tei", gu, h)  # [T, E, 2I]
    assert (pre[..., :I] > 0.6).any() and (pre[..., I:].abs() > 0.6).any()
    clamped = gated_experts(h, idx, w, gu, dn, 0, act="gpt_oss:1.702:0.6")
    unclamped = ref_experts(h, idx, w, gu, dn, act="gpt_oss:1.702:1e9")
    assert not torch.allclose(clamped, unclamped)


def test_parse_activation_pointwise():
    g = torch.linspace(-9, 9, 37, dtype=F64)
    u = torch.linspace(8, -8, 37, dtype=F64)
    for act in ACTS:
        ref = _ref_act(act)
        want = torch.tensor([ref(float(a), float(b)) for a, b in zip(g, u)], dtype=F64)
        torch.testing.assert_close(parse_activation(act)(g, u), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ layouts and biases
LAYOUTS = ["", "gate_up_t", "down_t", "gate_up_t,down_t", "interleaved", "gate_up_t,down_t,interleaved", "interleaved,down_t"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_layouts_and_biases(layout, bias):
    h, idx, w, gu, dn, gub, db = _problem(seed=2)
    flags = {f for f in layout.split(",") if f}
    s_gu, s_dn, s_gub = to_layout(gu, dn, gub if bias else None, flags)
    act = "gpt_oss:1.702:7.0" if "interleaved" in flags else "silu"
    got = gated_experts(h, idx, w, s_gu, s_dn, 0, s_gub, db if bias else None, act=act, layout=layout)
    want = ref_experts(h, idx, w, gu, dn, 0, gub if bias else None, db if bias else None, act=act)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_static_form_matches_the_reference(layout, bias):
    """gated_experts_static (what runs inside CUDA-graph capture) against the same float64 reference, on an
    expert slice (ids outside it add nothing)."""
    h, idx, w, gu, dn, gub, db = _problem(seed=2)
    flags = {f for f in layout.split(",") if f}
    s_gu, s_dn, s_gub = to_layout(gu[1:3], dn[1:3], gub[1:3] if bias else None, flags)
    act = "gpt_oss:1.702:7.0" if "interleaved" in flags else "silu"
    got = gated_experts_static(h, idx, w, s_gu, s_dn, 1, s_gub, db[1:3] if bias else None, act=act, layout=layout)
    want = ref_experts(h, idx, w, gu[1:3], dn[1:3], 1, gub[1:3] if bias else None, db[1:3] if bias else None, act=act)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_inputs():
    h, idx, w, gu, dn, gub, db = _problem(seed=3, dtype=torch.float32)
    got = gated_experts(h, idx, w, gu, dn, 0, gub, db, act="gelu")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.to(F64), ref_experts(h, idx, w, gu, dn, 0, gub, db, act="gelu"), rtol=1e-5, atol=1e-5)


def test_swiglu_experts_is_silu_default_layout():
    h, idx, w, gu, dn, _, _ = _problem(seed=4)
    torch.testing.assert_close(swiglu_experts(h, idx, w, gu, dn, 0), ref_experts(h, idx, w, gu, dn), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ expert slices
@pytest.mark.parametrize("bias", [False, True])
def test_slices_sum_to_the_whole(bias):
    """An expert node holding experts [first, first + E_local) skips other ids (they add zero), so the halves
    held by two nodes sum to the whole layer."""
    h, idx, w, gu, dn, gub, db = _problem(seed=5)
    b = (gub, db) if bias else (None, None)
    whole = ref_experts(h, idx, w, gu, dn, 0, *b)
    lo = gated_experts(h, idx, w, gu[:2], dn[:2], 0, *(x[:2] if x is not None else None for x in b))
    hi = gated_experts(h, idx, w, gu[2:], dn[2:], 2, *(x[2:] if x is not None else None for x in b))
    torch.testing.assert_close(lo, ref_experts(h, idx, w, gu[:2], dn[:2], 0, *(x[:2] if x is not None else None for x in b)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hi, ref_experts(h, idx, w, gu[2:], dn[2:], 2, *(x[2:] if x is not None else None for x in b)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lo + hi, whole, rtol=1e-12, atol=1e-12)


def test_tokens_routed_elsewhere_get_zero():
    """Tokens whose top-k ids all lie outside the node's slice (below it, above it, or the EP sentinel E)
    get exactly zero rows, biases included."""
    h, _, w, gu, dn, gub, db = _problem(seed=6)
    idx = torch.tensor([[0, 1], [3, 4], [1, 2], [0, 4], [2, 3], [1, 0], [4, 4]])
    got = gated_experts(h, idx, w, gu[2:4], dn[2:4], 2, gub[2:4], db[2:4])
    for t in (0, 3, 5, 6):
        assert torch.equal(got[t], torch.zeros(H, dtype=F64))
    torch.testing.assert_close(got, ref_experts(h, idx, w, gu[2:4], dn[2:4], 2, gub[2:4], db[2:4]), rtol=1e-12, atol=1e-12)


def test_zero_tokens():
    h, idx, w, gu, dn, gub, db = _problem(seed=7, n_tok=0)
    out = gated_experts(h, idx, w, gu, dn, 0, gub, db, act="gpt_oss:1.702:7.0", layout="")
    assert out.shape == (0, H) and out.dtype == F64


def test_zero_topk_weight_equals_dropping_the_slot():
    h, idx, w, gu, dn, gub, db = _problem(seed=8)
    w = w.clone()
    w[2, 0] = 0.0
    w[5, 1] = 0.0
    got = gated_experts(h, idx, w, gu, dn, 0, gub, db)
    dropped = idx.clone()
    dropped[2, 0] = 99  # an id no node holds
    dropped[5, 1] = 99
    torch.testing.assert_close(got, ref_experts(h, dropped, w, gu, dn, 0, gub, db), rtol=1e-12, atol=1e-12)


def test_same_expert_twice_in_topk_counts_twice():
    h, _, w, gu, dn, _, _ = _problem(seed=9)
    idx = torch.full((T, K), 1, dtype=torch.int64)
    torch.testing.assert_close(gated_experts(h, idx, w, gu, dn, 0), ref_experts(h, idx, w, gu, dn), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ router
def test_softmax_topk_router():
    g = torch.Generator().manual_seed(10)
    hidden = torch.randn(9, H, generator=g, dtype=F64)
    weight = torch.randn(6, H, generator=g, dtype=F64)
    top_w, top_i = softmax_topk_router(hidden, weight, 3)
    for t in range(9):
        logits = [float(weight[e] @ hidden[t]) for e in range(6)]
        m = max(logits)
        p = [math.exp(v - m) for v in logits]
        p = [v / sum(p) for v in p]
        order = sorted(range(6), key=lambda e: -p[e])[:3]
        s = sum(p[e] for e in order)
        assert top_i[t].tolist() == order
        torch.testing.assert_close(top_w[t].to(F64), torch.tensor([p[e] / s for e in order], dtype=F64), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("act", ["swiglu2", "gelu_accurate", "SILU"])
def test_unknown_activation(act):
    with pytest.raises(MscError, match=f"'{act}'"):
        parse_activation(act)
    h, idx, w, gu, dn, _, _ = _problem(seed=0)
    with pytest.raises(MscError, match=f"'{act}'"):
        gated_experts(h, idx, w, gu, dn, 0, act=act)


@pytest.mark.parametrize("act", ["gpt_oss:1.7", "gpt_oss:x:7"])
def test_malformed_gpt_oss_activation(act):
    with pytest.raises(MscError, match=act):
        parse_activation(act)


@pytest.mark.parametrize("layout", ["transposed", "gate_up_t,down_T", "interleave"])
def test_unknown_layout(layout):
    bad = [f for f in layout.split(",") if f not in ("gate_up_t", "down_t", "interleaved")]
    with pytest.raises(MscError, match=bad[0]):
        parse_layout(layout)
    h, idx, w, gu, dn, _, _ = _problem(seed=0)
    with pytest.raises(MscError, match=bad[0]):
        gated_experts(h, idx, w, gu, dn, 0, layout=layout)


# ------------------------------------------------------------------------------------------ vs transformers
def _hf_experts(name: str, hidden_act: str = "silu"):
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    if name == "mixtral":
        cfg, cls = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, hidden_act=hidden_act), MixtralExperts
    elif name == "qwen3_moe":
        cfg, cls = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, hidden_act=hidden_act), Qwen3MoeExperts
    else:
        cfg, cls = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K), GptOssExperts
    cfg._experts_implementation = "eager"  # the class's own forward
    mod = cls(cfg).to(F64).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in mod.parameters():
            # large enough that GPT-OSS's clamp at limit 7 is reached
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * (1.0 if name == "gpt_oss" else 0.4))
    return mod


@pytest.mark.parametrize("name,hidden_act", [("mixtral", "silu"), ("mixtral", "gelu_pytorch_tanh"), ("mixtral", "relu"),
                                             ("qwen3_moe", "silu"), ("gpt_oss", None)])
def test_against_transformers_experts(name, hidden_act):
    mod = _hf_experts(name, hidden_act or "silu")
    act, layout = describe_experts(mod, "experts")
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(T, H, generator=g, dtype=F64) * 2
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g, dtype=F64), dim=-1)
    with torch.no_grad():
        want = mod(hidden, idx, w)
        bias = (mod.gate_up_proj_bias, mod.down_proj_bias) if getattr(mod, "has_bias", False) else (None, None)
        got = gated_experts(hidden, idx, w, mod.gate_up_proj, mod.down_proj, 0, *bias, act=act, layout=layout)
    if name == "gpt_oss":
        assert layout == "gate_up_t,down_t,interleaved" and act.startswith("gpt_oss:")
        pre = torch.einsum("th,ehj->tej", hidden, mod.gate_up_proj) + mod.gate_up_proj_bias
        assert (pre[..., ::2] > mod.limit).any() and (pre[..., 1::2].abs() > mod.limit).any()  # clamps are reached
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # and both halves on two nodes sum to it
    lo = gated_experts(hidden, idx, w, mod.gate_up_proj[:2], mod.down_proj[:2], 0,
                       *(b[:2] if b is not None else None for b in bias), act=act, layout=layout)
    hi = gated_experts(hidden, idx, w, mod.gate_up_proj[2:], mod.down_proj[2:], 2,
                       *(b[2:] if b is not None else None for b in bias), act=act, layout=layout)
    torch.testing.assert_close(lo + hi, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ up-only experts
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fn", [gated_experts, gated_experts_static])
def test_up_only_relu2_experts_equal_a_per_token_reference(fn, transposed):
    """Nemotron-H's experts (no gate: relu(up x)² then down), stored [E, I, H] / [E, H, I] or transposed (Ergo)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g, dtype=F64)
    up = torch.randn(E, I, H, generator=g, dtype=F64)
    down = torch.randn(E, H, I, generator=g, dtype=F64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    w = torch.rand(T, K, generator=g, dtype=F64)
    want = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            for o in range(H):
                acc = 0.0
                for i in range(I):
                    u = sum(float(up[e, i, j]) * float(x[t, j]) for j in range(H))
                    acc += max(u, 0.0) ** 2 * float(down[e, o, i])
                want[t, o] += float(w[t, k]) * acc
    if transposed:
        got = fn(x, idx, w, up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous(), 0, act="relu2",
                 layout="up_only,gate_up_t,down_t")
    else:
        got = fn(x, idx, w, up, down, 0, act="relu2", layout="up_only")
    torch.testing.assert_close(got, want)


def test_up_only_experts_take_a_plain_activation_only():
    with pytest.raises(MscError, match="not supported for experts without a gate"):
        gated_experts(torch.zeros(1, H), torch.zeros(1, K, dtype=torch.long), torch.ones(1, K), torch.zeros(E, I, H),
                      torch.zeros(E, H, I), 0, act="gpt_oss:1.7:7.0", layout="up_only")
