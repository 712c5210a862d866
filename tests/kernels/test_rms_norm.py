"""RMSNorm and residual-add + RMSNorm: the Triton kernel (interpreter on CPU, native on CUDA) against
the torch path, and both against a float64 formula written out here."""
from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.ops.rms_norm import (fused_add_rms_norm, fused_add_rms_norm_torch, rms_norm,
                                                     rms_norm_torch)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rms_norm_f64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps), all in float64."""
    x, w = x.double(), w.double()
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 100), (3, 5, 48)])  # 100: not a power of two; 3-D input
def test_rms_norm_triton_vs_torch_and_f64(dtype, shape, device):
    x = (torch.randn(shape) * 3 + 0.5).to(device=device, dtype=dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(device=device, dtype=dtype)
    got = rms_norm(x, w, 1e-5, use_triton=True)
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, rms_norm_torch(x, w, 1e-5), dtype, name="vs torch path")
    assert_close(got, rms_norm_f64(x, w, 1e-5), dtype, name="vs float64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype, device):
    x = torch.randn(9, 80).to(device=device, dtype=dtype)
    res = (torch.randn(9, 80) * 4).to(device=device, dtype=dtype)
    w = (torch.rand(80) + 0.5).to(device=device, dtype=dtype)
    x0, res0 = x.clone(), res.clone()
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6, use_triton=True)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"
    ref_out, ref_res = fused_add_rms_norm_torch(x, res, w, 1e-6)
    # the sum is rounded to the dtype exactly as torch rounds x + residual (the interpreter truncates
    # float32 -> bfloat16 instead of rounding to nearest: there, bf16 is only close)
    if dtype != torch.bfloat16 or x.is_cuda:
        assert torch.equal(new_res, ref_res)
    assert_close(new_res, ref_res, dtype, name="residual")
    assert_close(out, ref_out, dtype, name="vs torch path")
    assert_close(out, rms_norm_f64(x.double() + res.double(), w, 1e-6), dtype, name="vs float64")


def test_strided_rows_and_empty(device):
    """A column slice (row stride > width) is read in place; zero rows give an empty result."""
    base = torch.randn(6, 96, device=device)
    x = base[:, 16:80]
    w = torch.rand(64, device=device) + 0.5
    assert_close(rms_norm(x, w, 1e-6, use_triton=True), rms_norm_f64(x, w, 1e-6), torch.float32)
    empty = torch.empty(0, 64, device=device)
    assert rms_norm(empty, w, 1e-6, use_triton=True).shape == (0, 64)
    out, res = fused_add_rms_norm(empty, empty, w, 1e-6, use_triton=True)
    assert out.shape == res.shape == (0, 64)


def test_layer_uses_kernel_and_matches_torch_path(device):
    """RMSNorm(x, residual) with the kernel equals the torch path."""
    norm = RMSNorm(48, 1e-6, params_dtype=torch.float16, device=device)
    norm.weight.data.copy_(torch.rand(48) + 0.5)
    x = torch.randn(5, 48, device=device, dtype=torch.float16)
    res = torch.randn(5, 48, device=device, dtype=torch.float16)
    norm.use_triton = True
    y, r = norm(x, res)
    norm.use_triton = False
    y_ref, r_ref = norm(x, res)
    assert torch.equal(r, r_ref)
    assert_close(y, y_ref, torch.float16)


def test_errors(device):
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="RMSNorm over"):
        rms_norm(torch.randn(2, 9, device=device), w, 1e-6, use_triton=True)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(torch.randn(2, 8, device=device), torch.randn(3, 8, device=device), w, 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [2048, 4096, 128])
def test_cuda_widths(dtype, width):
    x = torch.randn(257, width, device="cuda", dtype=dtype)
    res = torch.randn(257, width, device="cuda", dtype=dtype)
    w = (torch.rand(width, device="cuda") + 0.5).to(dtype)
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_torch(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)
    assert_close(out, ref_out, dtype)
    assert_close(rms_norm(x, w, 1e-6), rms_norm_f64(x, w, 1e-6), dtype)
