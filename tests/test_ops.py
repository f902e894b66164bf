"""The pure msc ops against an independent float64 computation."""
import torch

from tests.conftest import ToyMoE, dense_moe_reference


def test_router_and_experts_match_dense_float64_reference():
    m = ToyMoE(layers=1, hidden=8, inter=16, experts=4, top_k=2)
    x = torch.randn(11, 8)
    w, i = torch.ops.msc.router(x, m.gate[0], 2, 0)
    y = torch.ops.msc.experts(x, i, w, m.gate_up[0], m.down[0], 0, 0)
    ref = dense_moe_reference(x, m.gate[0], m.gate_up[0], m.down[0], 2)
    assert torch.allclose(y.double(), ref, atol=1e-5)


def test_expert_slices_sum_to_the_whole_layer():
    m = ToyMoE(layers=1, experts=5)
    x = torch.randn(9, 8)
    w, i = torch.ops.msc.router(x, m.gate[0], 2, 0)
    full = torch.ops.msc.experts(x, i, w, m.gate_up[0], m.down[0], 0, 0)
    parts = sum(
        torch.ops.msc.experts(x, i, w, m.gate_up[0][lo:hi], m.down[0][lo:hi], 0, lo) for lo, hi in ((0, 2), (2, 3), (3, 5))
    )
    assert torch.allclose(parts, full, atol=1e-6)
    assert full.abs().sum() > 0


def test_experts_handles_zero_tokens():
    m = ToyMoE(layers=1)
    x = torch.empty(0, 8)
    y = torch.ops.msc.experts(x, torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2), m.gate_up[0], m.down[0], 0, 0)
    assert y.shape == (0, 8)
