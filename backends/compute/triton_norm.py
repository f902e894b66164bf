"""RMSNorm in one Triton kernel, optionally with the residual add before it (msc::rms_norm / msc::add_rms_norm).

transformers' RMSNorm is eight kernels once captured (cast to float32, square, mean, add eps, rsqrt, scale,
cast back, times the weight) and the residual add before it one more; at decode sizes each is a few
microseconds of launch and a round trip of the row through memory. Here one program normalises one row:

    s = x + residual (in x's dtype, as the add rounds)            (add_rms_norm only; s is also returned)
    y = weight * (float32(s) * rsqrt(mean(float32(s)^2) + eps)).to(x.dtype)

The float32 sum of squares is reduced in a different order than torch's mean, so a value can differ from the
unfused graph's in its last bit; the CPU path (msc.ops) runs the unfused ops themselves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_ROW = 65536  # wider rows take the eager path (one program holds a row in registers)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, stride_x, stride_r, stride_o, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as torch adds
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.math.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)  # the input dtype before the weight, as the model
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def supported(x: Tensor, weight: Tensor, residual: Tensor | None = None) -> bool:
    """Whether the kernel covers the call: a CUDA tensor whose last dim is the weight's, same dtypes, a
    residual of x's shape (no broadcasting)."""
    return (x.is_cuda and x.dim() >= 1 and weight.dim() == 1 and x.shape[-1] == weight.shape[0] <= MAX_ROW
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)))


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(weight * normalised(x [+ residual]), x + residual or None); x [..., H], weight [H]."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h).contiguous()  # [N, H]
    r2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
    out = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else out
    n = x2.shape[0]
    if n:
        block = triton.next_power_of_2(h)
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        _rms_norm_kernel[(n,)](x2, r2, weight, out, s, h, float(eps), x2.stride(0), r2.stride(0), out.stride(0),
                               s.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps)
    return out.view(x.shape), (s.view(x.shape) if residual is not None else None)
