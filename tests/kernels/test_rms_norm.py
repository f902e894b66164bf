"""The RMSNorm kernel (backends/compute/triton_norm.py; msc::rms_norm / msc::add_rms_norm on a GPU) against a
float64 reference and against the unfused ops it replaces (the model's own RMSNorm), with and without the
residual add. Without a GPU the kernel runs through Triton's interpreter (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch

triton_norm = pytest.importorskip("msc.backends.compute.triton_norm", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def unfused(x, weight, eps, residual=None):
    """What transformers' RMSNorm computes (Mixtral's / Llama's module), after the residual add if any."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    s = x + residual if residual is not None else x
    norm = MixtralRMSNorm(x.shape[-1], eps=eps).to(x.device, x.dtype)
    norm.weight.data.copy_(weight)
    return norm(s), s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 48), (1, 1, 100)])  # rows of a packed step; a non-power-of-two width
@pytest.mark.parametrize("with_residual", [False, True])
def test_kernel_equals_the_model_s_norm(dtype, shape, with_residual):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEVICE)
    residual = torch.randn(*shape, generator=g).to(dtype).to(DEVICE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    out, total = triton_norm.rms_norm(x, weight, 1e-5, residual)
    want, want_sum = unfused(x, weight, 1e-5, residual)
    assert out.shape == x.shape and out.dtype == dtype
    if with_residual:  # the sum rounds as torch's add does (the interpreter truncates bf16: within one ulp)
        if DEVICE == "cuda" or dtype == torch.float32:
            assert torch.equal(total, want_sum)
        else:
            assert ((total.double() - want_sum.double()).abs() <= 2 ** -7 * want_sum.double().abs()).all()
    else:
        assert total is None
    # float64 reference of the same formula (before the final rounding)
    s64 = want_sum.double()
    ref = weight.double() * (s64 / torch.sqrt((s64 ** 2).mean(-1, keepdim=True) + 1e-5))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16 keeps 8 bits
    torch.testing.assert_close(out.double(), ref, rtol=tol * 2, atol=tol * 2)
    # against the unfused graph: equal but for the last bits where the float32 sums differ in order. NOTE:
    # Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest), and the kernel rounds twice
    # (the normalised row, then the product with the weight), as the model does: up to 3 bf16 ulps there
    ulps = 4 if dtype == torch.float32 else (1 if DEVICE == "cuda" else 3)  # (a GPU's rsqrt is approximate)
    ulp = 2 ** -23 if dtype == torch.float32 else 2 ** -7
    err = (out.double() - want.double()).abs() / (ulp * want.double().abs().clamp(min=2 ** -6))
    assert err.max().item() <= ulps * 1.01


def test_what_the_kernel_does_not_cover():
    x = torch.zeros(2, 8)
    assert not triton_norm.supported(x, torch.zeros(8))  # a CPU tensor: the eager ops run
    if torch.cuda.is_available():
        xc = x.cuda()
        assert triton_norm.supported(xc, torch.zeros(8, device="cuda"))
        assert not triton_norm.supported(xc, torch.zeros(4, device="cuda"))  # width is not the weight's
        assert not triton_norm.supported(xc, torch.zeros(8, device="cuda"), torch.zeros(1, 8, device="cuda"))  # broadcast
        assert not triton_norm.supported(xc, torch.zeros(8, device="cuda", dtype=torch.bfloat16))  # mixed dtypes
