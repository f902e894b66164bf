"""The routing kernel (backends/compute/triton_router.py; msc::router on a GPU) against the eager routing it
replaces (torch's softmax, top-k and renormalisation) and a float64 reference. Without a GPU the kernel runs
through Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

triton_router = pytest.importorskip("msc.backends.compute.triton_router", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tokens, experts, top_k", [(5, 8, 2), (70, 8, 2), (3, 60, 4), (9, 128, 8), (1, 6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_routes_as_the_eager_router(tokens, experts, top_k, dtype):
    g = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = (torch.randn(tokens, experts, generator=g) * 2).to(dtype).to(DEVICE)
    w, idx = triton_router.softmax_topk(logits, top_k)
    probs = torch.softmax(logits.float(), -1)
    want_w, want_i = torch.topk(probs, top_k, -1)
    want_w = want_w / want_w.sum(-1, keepdim=True)
    assert w.shape == idx.shape == (tokens, top_k) and w.dtype == torch.float32 and idx.dtype == torch.int64
    # NOTE: bf16 logits tie often; torch.topk orders equal values as its implementation happens to (CPU and GPU
    # differ). Where torch's choice differs from the kernel's it may only be among equal logits, in either order
    for r in range(tokens):
        if not torch.equal(idx[r], want_i[r]):
            assert torch.equal(logits[r, idx[r]], logits[r, want_i[r]]), r
            torch.testing.assert_close(w[r].sort().values, want_w[r].sort().values, rtol=2e-6, atol=1e-7)
        else:
            torch.testing.assert_close(w[r], want_w[r], rtol=2e-6, atol=1e-7)
    chosen = logits.float().gather(1, idx).min(-1).values  # a valid top-k: nothing left out is larger
    left = logits.float().scatter(1, idx, float("-inf")).max(-1).values
    assert (chosen >= left).all()
    p64 = torch.softmax(logits.double(), -1)  # float64: the chosen experts' weights
    ref = p64.gather(1, idx) / p64.gather(1, idx).sum(-1, keepdim=True)
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-7)


def test_the_router_op_routes_as_a_float64_reference():
    """msc::router (the kernel after the matmul on a GPU, the eager routing on a CPU) against softmax, top-k and
    renormalisation in float64 of the same logits; the kernel refuses what it does not cover."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=g).to(DEVICE), torch.randn(8, 16, generator=g).to(DEVICE)
    w, idx = torch.ops.msc.router(hidden, weight, 2, 0)
    p64 = torch.softmax((hidden.double() @ weight.double().T), -1)  # [T, E]
    want_w, want_i = p64.topk(2, -1)
    assert torch.equal(idx, want_i)  # float32 logits of random data: no near-ties at this size
    torch.testing.assert_close(w.double(), want_w / want_w.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert not triton_router.supported(torch.zeros(4, 8), 2)  # CPU tensor
    assert not triton_router.supported(torch.zeros(8, 4, device=DEVICE).t(), 2)  # experts not contiguous
