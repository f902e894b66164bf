"""The rotary kernel (backends/compute/triton_rotary.py; msc::rotary on a GPU) against transformers' own
apply_rotary_pos_emb on the same tensors (bit for bit on a GPU) and a float64 reference. Without a GPU the
kernel runs through Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

triton_rotary = pytest.importorskip("msc.backends.compute.triton_rotary", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(dtype, heads, tokens, d, seed):
    """q as the attention layer makes it: [1, T, nh * d] viewed [1, nh, T, d] (a transposed, strided view),
    cos / sin [1, 1, T, d] from positions, as transformers' rotary embedding makes them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, tokens, heads * d, generator=g).to(dtype).to(DEVICE).view(1, tokens, heads, d).transpose(1, 2)
    pos = torch.randint(0, 4096, (tokens,), generator=g).double()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)  # [T, d]
    cos, sin = ang.cos()[None, None].to(dtype).to(DEVICE), ang.sin()[None, None].to(dtype).to(DEVICE)
    return q, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, tokens, d", [(4, 5, 16), (3, 1, 64), (2, 7, 128)])
def test_kernel_equals_transformers_rotary(dtype, heads, tokens, d):
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    q, cos, sin = _inputs(dtype, heads, tokens, d, seed=heads * tokens + d)
    assert triton_rotary.supported(q, cos, sin, d // 2) == (DEVICE == "cuda")  # CPU tensors: the eager path
    out = triton_rotary.rotary(q, cos, sin, d // 2)
    want, _ = apply_rotary_pos_emb(q, q, cos[0], sin[0])  # transformers unsqueezes cos / sin itself
    assert out.shape == want.shape and out.dtype == dtype
    if DEVICE == "cuda" or dtype == torch.float32:  # each product and the sum rounded as torch rounds them
        assert torch.equal(out, want)
    q64, c64, s64 = q.double(), cos.double(), sin.double()
    rot = torch.cat((-q64[..., d // 2:], q64[..., : d // 2]), -1)
    ref = q64 * c64 + rot * s64
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # NOTE: the interpreter truncates float32 -> bf16 where a GPU rounds: each of the three roundings is off
        # by at most one ulp of its own value (the products' ulps can exceed the sum's where they cancel)
        terms = (q64 * c64).abs() + (rot * s64).abs()
        assert ((out.double() - want.double()).abs() <= 2 ** -6 * terms + 2 ** -7 * want.double().abs()).all()
    tol = 1e-6 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_the_op_takes_the_kernel_only_where_it_covers_the_call():
    """msc::rotary on CPU tensors, or with halves that do not split the last dim evenly, runs the captured ops."""
    q, cos, sin = _inputs(torch.float32, 2, 3, 16, seed=1)
    want = q * cos + torch.cat((-q[..., 8:], q[..., :8]), -1) * sin
    assert torch.equal(torch.ops.msc.rotary(q, cos, sin, 3, 8, -1), want)
    assert not triton_rotary.supported(q, cos, sin, 6)  # uneven halves
    assert not triton_rotary.supported(q, cos.double(), sin, 8)  # mixed dtypes: torch would promote
