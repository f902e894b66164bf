"""The Triton fused MoE kernel (backends/compute/triton_moe.py) against a float64 reference.

On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the sizes here are tiny; the bf16 check at a real shape needs a CUDA device.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton_moe = pytest.importorskip("msc.backends.compute.triton_moe", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# NOTE: a GPU's float32 tl.dot multiplies in TF32 (10-bit mantissas): about 1e-3 relative, where the
# interpreter's float32 products are exact to float32 rounding
TOL = 1e-5 if DEVICE == "cpu" else 5e-3


def reference(hidden, idx, w, gate_up, down, first, act="silu"):
    """An independent float64 loop over (token, k) pairs."""
    fns = {"silu": F.silu, "relu": F.relu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    hidden, gate_up, down, w = hidden.double(), gate_up.double(), down.double(), w.double()
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k]) - first
            if not 0 <= e < gate_up.shape[0]:
                continue
            gu = gate_up[e] @ hidden[t]
            out[t] += w[t, k] * (down[e] @ (fns[act](gu[:inter]) * gu[inter:]))
    return out


def make(t, h, inter, e_total, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    logits = torch.randn(t, e_total, generator=g)
    w, idx = torch.softmax(logits, -1).topk(k, -1)
    gate_up = (torch.randn(e_total, 2 * inter, h, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e_total, h, inter, generator=g) / inter**0.5).to(dtype)
    return [x.to(DEVICE) for x in (hidden, idx, w, gate_up, down)]


def rel_err(out, ref):
    return ((out.double().cpu() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("t,seed", [(1, 0), (5, 1), (37, 2)])
def test_matches_float64_reference(t, seed):
    hidden, idx, w, gate_up, down = make(t, 32, 48, 4, 2, torch.float32, seed)
    out = triton_moe.fused_moe(hidden, idx, w, gate_up, down)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert rel_err(out, reference(hidden, idx, w, gate_up, down, 0)) < TOL


@pytest.mark.parametrize("act", ["relu", "gelu_pytorch_tanh"])
def test_other_activations(act):
    hidden, idx, w, gate_up, down = make(9, 32, 32, 4, 2, torch.float32, 3)
    out = triton_moe.fused_moe(hidden, idx, w, gate_up, down, act=act)
    assert rel_err(out, reference(hidden, idx, w, gate_up, down, 0, act)) < TOL


def test_expert_slice_partial_sums_add_up():
    """Two nodes holding experts 0-2 and 3-5: each gives a partial sum; together the whole layer."""
    hidden, idx, w, gate_up, down = make(11, 32, 32, 6, 2, torch.float32, 4)
    parts = [triton_moe.fused_moe(hidden, idx, w, gate_up[lo:lo + 3], down[lo:lo + 3], first_expert=lo) for lo in (0, 3)]
    full = reference(hidden, idx, w, gate_up, down, 0)
    assert rel_err(parts[0], reference(hidden, idx, w, gate_up[:3], down[:3], 0)) < TOL
    assert rel_err(parts[0] + parts[1], full) < TOL


def test_no_tokens_and_untouched_experts():
    hidden, idx, w, gate_up, down = make(0, 32, 32, 4, 2, torch.float32, 5)
    assert triton_moe.fused_moe(hidden, idx, w, gate_up, down).shape == (0, 32)
    hidden, idx, w, gate_up, down = make(3, 32, 32, 4, 2, torch.float32, 6)
    idx = torch.full_like(idx, 9)  # every token routed to an expert this slice does not hold
    assert torch.equal(triton_moe.fused_moe(hidden, idx, w, gate_up, down), torch.zeros_like(hidden))


def test_align_groups_assignments_by_expert():
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 6, (13, 2), generator=g).to(DEVICE)
    bm = 4
    sorted_ids, token_of, block_expert, tiles_used = triton_moe.moe_align(idx, 1, 4, bm)  # local experts: global 1..4
    a = idx.numel()
    flat = idx.reshape(-1)
    seen = sorted(int(i) for i in sorted_ids if i < a)
    assert seen == sorted(i for i in range(a) if 1 <= flat[i] <= 4)  # every local assignment once, no others
    for b, e in enumerate(block_expert.tolist()):
        tile = [int(i) for i in sorted_ids[b * bm:(b + 1) * bm] if i < a]
        if e == 4:
            assert not tile
        else:
            assert all(int(flat[i]) - 1 == e for i in tile)
    assert token_of.tolist() == [int(i) // 2 if i < a else 0 for i in sorted_ids]
    assert int(tiles_used) == sum(1 for e in block_expert.tolist() if e < 4)


@pytest.mark.parametrize("t,k,total,first,local,bm,seed", [
    (13, 2, 6, 1, 4, 4, 0), (0, 2, 4, 0, 4, 16, 1), (1, 1, 8, 0, 8, 16, 2), (300, 2, 8, 0, 8, 16, 3),
    (700, 8, 256, 64, 64, 32, 4),  # many chunks, 64 of 256 experts on this node
])
def test_triton_align_equals_the_torch_sort(t, k, total, first, local, bm, seed):
    """The three-kernel alignment against the stable-sort version in torch ops, field by field."""
    idx = torch.randint(0, total, (t, k), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    got, want = triton_moe.moe_align(idx, first, local, bm), triton_moe.moe_align_torch(idx, first, local, bm)
    for name, x, y in zip(got._fields, got, want):
        assert torch.equal(x.cpu(), y.cpu()), name


def tma_config(persistent, tile=16):
    tiles = dict(BLOCK_N=tile, BLOCK_K=tile, persistent=persistent)
    return {"BLOCK_M": tile, "tma": True, "gate_up": tiles, "down": dict(tiles)}


@pytest.mark.parametrize("persistent", [0, 1])
@pytest.mark.parametrize("t,inter,lo,hi,seed", [(1, 48, 0, 4, 10), (37, 40, 0, 4, 11), (11, 32, 2, 5, 12)])
def test_tma_path_matches_float64_reference(persistent, t, inter, lo, hi, seed, monkeypatch):
    """The Hopper path (gathered rows, tensor descriptors, optionally a persistent grid); inter 40 leaves a
    partial n tile; lo..hi is a slice of the experts, as an expert node holds."""
    probe = make(1, 32, inter, 4, 2, torch.float32, 0)
    if not triton_moe.tma_possible(probe[0], probe[3], probe[4]):
        pytest.skip("this Triton / device has no tensor descriptors (TMA)")
    taken = []
    real = triton_moe._fused_moe_tma
    monkeypatch.setattr(triton_moe, "_fused_moe_tma", lambda *a: taken.append(1) or real(*a))
    hidden, idx, w, gate_up, down = make(t, 32, inter, 5, 2, torch.float32, seed)
    out = triton_moe.fused_moe(hidden, idx, w, gate_up[lo:hi], down[lo:hi], first_expert=lo, config=tma_config(persistent))
    assert taken, "the TMA path did not run"
    assert rel_err(out, reference(hidden, idx, w, gate_up[lo:hi], down[lo:hi], lo)) < TOL


def test_bad_weights_are_a_clear_error():
    from msc.errors import MscError

    hidden, idx, w, gate_up, down = make(3, 32, 32, 4, 2, torch.float32, 8)
    with pytest.raises(MscError, match="do not match"):
        triton_moe.fused_moe(hidden, idx, w, gate_up[:, :, :16], down)
    with pytest.raises(MscError, match="activation"):
        triton_moe.fused_moe(hidden, idx, w, gate_up, down, act="tanh")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("t,config", [(16, None), (256, None), (4096, None), (64, "tma"), (4096, "tma"), (4096, "tma_persistent")])
def test_bf16_mixtral_shape_on_gpu(t, config):
    hidden, idx, w, gate_up, down = make(t, 4096, 1024, 8, 2, torch.bfloat16, 9)  # I cut to 1024 to keep it quick
    if config:
        cfg = tma_config(int(config.endswith("persistent")), tile=64)
        cfg["BLOCK_M"] = 128 if t > 256 else 32
        out = triton_moe.fused_moe(hidden, idx, w, gate_up, down, config=cfg)
    else:
        out = triton_moe.fused_moe(hidden, idx, w, gate_up, down)
    ref = torch.zeros(t, 4096, dtype=torch.float64, device=DEVICE)
    for e in range(8):  # float64 on the GPU, expert by expert
        rows, ks = torch.where(idx == e)
        gu = hidden[rows].double() @ gate_up[e].double().T
        y = (F.silu(gu[:, :1024]) * gu[:, 1024:]) @ down[e].double().T
        ref.index_add_(0, rows, y * w[rows, ks, None].double())
    assert rel_err(out, ref) < 1e-2
