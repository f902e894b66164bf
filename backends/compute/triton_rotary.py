"""Rotary position embedding in one Triton kernel (msc::rotary on a GPU).

transformers applies rotary to q and to k as `x * cos + rotate_half(x) * sin`, rotate_half(x) =
cat(-x[..., d/2:], x[..., :d/2]): once captured that is two slices, a negation, a cat, two products and a sum
per tensor, seven kernels and as many round trips of q or k through memory at decode sizes. Here one program
rotates BLOCK_R rows of the last dimension:

    out[c] = round(round(x[c] * cos[c]) + round(r[c] * sin[c])),   r[c] = -x[c + d/2] (c < d/2), x[c - d/2] (else)

with every product and the sum computed in float32 and rounded to x's dtype in between, as torch's
elementwise ops round each result: the kernel gives the unfused graph's values bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_DIM = 1024  # wider rows take the eager path


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, n1, n2, d, half,
                   sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2, so0, so1, so2,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] rows of the three leading dims
    i2 = rows % n2
    i1 = (rows // n2) % n1
    i0 = rows // (n2 * n1)
    cols = tl.arange(0, BLOCK_D)  # [D]
    mask = (rows < n_rows)[:, None] & (cols < d)[None, :]  # [R, D]
    partner = tl.where(cols < half, cols + half, cols - half)  # the column rotate_half reads
    x_row = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    x = tl.load(x_ptr + x_row + cols[None, :], mask=mask, other=0.0)
    p = tl.load(x_ptr + x_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.where((cols < half)[None, :], -p, p)
    c = tl.load(cos_ptr + (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + cols[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + cols[None, :], mask=mask, other=0.0)
    ty = out_ptr.dtype.element_ty
    a = (x.to(tl.float32) * c.to(tl.float32)).to(ty)  # rounded as torch's mul rounds
    b = (r * s.to(tl.float32)).to(ty)
    out = (a.to(tl.float32) + b.to(tl.float32)).to(ty)
    tl.store(out_ptr + (i0 * so0 + i1 * so1 + i2 * so2)[:, None] + cols[None, :], out, mask=mask)


def supported(x: Tensor, cos: Tensor, sin: Tensor, half: int) -> bool:
    """Whether the kernel covers the call: CUDA tensors of one dtype, rotate_half splitting the last dim in two
    equal halves, unit stride along it, cos / sin broadcastable to x."""
    if not (x.is_cuda and 1 <= x.dim() <= 4 and x.dtype == cos.dtype == sin.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    d = x.shape[-1]
    if 2 * half != d or d > MAX_DIM or x.stride(-1) != 1:
        return False
    try:
        c, s = cos.expand(x.shape), sin.expand(x.shape)
    except RuntimeError:
        return False
    return c.stride(-1) == 1 and s.stride(-1) == 1


def rotary(x: Tensor, cos: Tensor, sin: Tensor, half: int) -> Tensor:
    """x * cos + rotate_half(x) * sin; x [..., d] (up to 4 dims, any strides but a unit last one), cos / sin
    broadcastable to x. The result has x's layout where x is dense, else is contiguous."""
    out = torch.empty_like(x)
    lead = (None,) * (4 - x.dim())  # leading unit dims: every tensor seen as 4-D, without a copy
    x4, o4, c4, s4 = x[lead], out[lead], cos.expand(x.shape)[lead], sin.expand(x.shape)[lead]
    n0, n1, n2, d = x4.shape
    n_rows = n0 * n1 * n2
    if n_rows:
        block_d = triton.next_power_of_2(d)
        block_r = max(1, 2048 // block_d)
        _rotary_kernel[(triton.cdiv(n_rows, block_r),)](
            x4, c4, s4, o4, n_rows, n1, n2, d, half, *x4.stride()[:3], *c4.stride()[:3], *s4.stride()[:3],
            *o4.stride()[:3], BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
            enable_fp_fusion=False)  # NOTE: a fused multiply-add would skip the product's rounding that torch does
    return out
