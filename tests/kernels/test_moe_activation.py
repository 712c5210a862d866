"""MoE activations: the torch path against formulas written out here, and the
Triton kernel (interpreter on CPU, native on CUDA) against the torch path."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from tests.utils import assert_close, poison_
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation, moe_activation_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_ACTS = list(MoEActivation)


def _sig(v: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _gelu(v: torch.Tensor) -> torch.Tensor:
    return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))


def swigluoai_by_element(x: torch.Tensor) -> torch.Tensor:
    """gpt-oss clamped SwiGLU, one element at a time, on the interleaved layout
    (column 2j is gate j, column 2j + 1 is up j)."""
    rows, width = x.shape
    out = torch.empty(rows, width // 2, dtype=torch.float64)
    for r in range(rows):
        for j in range(width // 2):
            gate = float(x[r, 2 * j])
            up = float(x[r, 2 * j + 1])
            gate = min(gate, 7.0)
            up = max(min(up, 7.0), -7.0)
            out[r, j] = (up + 1.0) * gate / (1.0 + math.exp(-1.702 * gate))
    return out


def expected(act: MoEActivation, x: torch.Tensor) -> torch.Tensor:
    """Independent formulas in fp32 (fp64 for the element loop)."""
    xf = x.float()
    half = x.shape[1] // 2
    if act == MoEActivation.SILU:
        g, u = xf[:, :half], xf[:, half:]
        return g * _sig(g) * u
    if act == MoEActivation.GELU:
        g, u = xf[:, :half], xf[:, half:]
        return _gelu(g) * u
    if act == MoEActivation.SWIGLUOAI:
        return swigluoai_by_element(xf).float()
    if act == MoEActivation.SILU_NO_MUL:
        return xf * _sig(xf)
    if act == MoEActivation.GELU_NO_MUL:
        return _gelu(xf)
    if act == MoEActivation.RELU2_NO_MUL:
        return torch.where(xf > 0, xf * xf, torch.zeros_like(xf))
    raise AssertionError(act)


def make_x(rows: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    # Scale 4: many values past the gpt-oss clamp limit (7) on both sides.
    return (torch.randn(rows, width, device=device) * 4.0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS, ids=lambda a: a.value)
def test_torch_path_matches_formula(act, dtype):
    x = make_x(6, 24, dtype, "cpu")
    y = moe_activation_torch(act, x)
    assert y.dtype == dtype
    assert y.shape == (6, 12 if act.is_gated else 24)
    assert_close(y, expected(act, x), dtype)


def test_swigluoai_clamps():
    """Values chosen on both sides of the limit, checked by hand."""
    x = torch.tensor([[10.0, 10.0, -3.0, -20.0, 2.0, 0.5]])
    y = moe_activation_torch("swigluoai", x)[0].double()
    s = lambda v: 1.0 / (1.0 + math.exp(-1.702 * v))  # noqa: E731
    want = [(7.0 + 1.0) * 7.0 * s(7.0), (-7.0 + 1.0) * -3.0 * s(-3.0), (0.5 + 1.0) * 2.0 * s(2.0)]
    assert torch.allclose(y, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ALL_ACTS, ids=lambda a: a.value)
@pytest.mark.parametrize("rows,width", [(1, 16), (7, 96), (3, 2 * 1100)])
def test_triton_matches_torch(act, dtype, rows, width, device):
    x = make_x(rows, width, dtype, device)
    out = poison_(torch.empty(rows, width // 2 if act.is_gated else width, dtype=dtype, device=device))
    y = moe_activation(act, x, out, use_triton=True)
    assert y is out
    assert_close(out, moe_activation_torch(act, x), dtype)


@pytest.mark.parametrize("act", [MoEActivation.SILU, MoEActivation.SWIGLUOAI, MoEActivation.RELU2_NO_MUL],
                         ids=lambda a: a.value)
def test_triton_strided_views(act, device):
    """x and out are column slices of wider buffers (row stride != width)."""
    rows, width = 5, 64
    w_out = width // 2 if act.is_gated else width
    x = make_x(rows, width + 16, torch.bfloat16, device)[:, 8 : 8 + width]
    out_buf = poison_(torch.empty(rows, w_out + 8, dtype=torch.float32, device=device))
    moe_activation(act, x, out_buf[:, :w_out], use_triton=True)
    assert_close(out_buf[:, :w_out], moe_activation_torch(act, x).float(), torch.bfloat16)
    assert out_buf[:, w_out:].isnan().all()


def test_zero_rows(device):
    x = torch.empty(0, 32, device=device)
    assert moe_activation("silu", x, use_triton=True).shape == (0, 16)
    assert moe_activation("silu", x, use_triton=False).shape == (0, 16)


def test_default_path_and_out(device):
    x = make_x(4, 32, torch.float16, device)
    y = moe_activation(MoEActivation.GELU, x)  # torch on CPU, Triton on CUDA
    assert y.shape == (4, 16) and y.dtype == torch.float16
    assert_close(y, moe_activation_torch("gelu", x), torch.float16)


def test_errors(monkeypatch):
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="silu, gelu, swigluoai"):
        moe_activation("tanh", x)
    with pytest.raises(ValueError, match="even width"):
        moe_activation("silu", torch.randn(3, 9))
    with pytest.raises(ValueError, match="out must be"):
        moe_activation("silu", x, torch.empty(3, 10))
    with pytest.raises(ValueError, match="2-D"):
        moe_activation("silu", torch.randn(10))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        moe_activation("silu", x, use_triton=True)


def test_compiles_for_hopper_without_a_gpu():
    """The interpreter runs the numbers; the compiler (sm_90, no GPU needed) sees types and layouts, with and
    without the fp32 delta (``delta=``, the LoRA side stream's join)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm.model_executor.layers.fused_moe.ops._activation_kernel import _moe_activation_kernel as k
for dt in ("bf16", "fp16", "fp32"):
    for act in range(6):
        for delta in (False, True):
            cexp = {"ACT": act, "BLOCK_N": 512, "HAS_DELTA": delta, "USE_PDL": False}
            cexp.update({p.name: p.default for p in k.params if p.is_constexpr and p.name not in cexp})
            sig = {n: ("*" + dt) if n in ("x_ptr", "out_ptr") else "*fp32" if n == "d_ptr" else
                   "fp32" if n in ("alpha", "limit") else "constexpr" if n in cexp else "i32" for n in k.arg_names}
            src = ASTSource(k, sig, constexprs={(k.arg_names.index(n),): v for n, v in cexp.items()})
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            print("ok", dt, act, delta)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 36
