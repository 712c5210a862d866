"""moe_sum (the top-k sum after GEMM2): the Triton kernel (interpreter on CPU) against an fp64 sum."""
import os
import subprocess
import sys

import pytest
import torch

from tests.utils import poison_
from vllm.model_executor.layers.fused_moe.ops.moe_sum import moe_sum


@pytest.mark.parametrize("M,top_k,H", [(1, 8, 2048), (3, 6, 100), (5, 1, 33), (2, 2, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_fp64_sum(M, top_k, H, dtype, device):
    g = torch.Generator().manual_seed(M * 100 + top_k)
    x = torch.randn(M, top_k, H, generator=g).to(dtype).to(device)
    out_buf = poison_(torch.empty(M, H + 8, dtype=dtype, device=device))
    out = out_buf[:, :H]  # a strided view
    moe_sum(x, out, use_triton=True)
    ref = x.double().sum(dim=1)
    # fp32 accumulation, one rounding: within one ulp of the dtype of the exact sum
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * top_k)
    assert out_buf[:, H:].isnan().all(), "columns past H must not be written"
    torch_out = moe_sum(x, torch.empty(M, H, dtype=dtype, device=device), use_triton=False)
    assert torch.allclose(out.double(), torch_out.double(), rtol=tol, atol=tol * top_k)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"x must be \[M, top_k, H\] and out \[M, H\]"):
        moe_sum(torch.zeros(2, 3, 4), torch.zeros(2, 3))


def test_compiles_for_hopper_without_a_gpu():
    """The interpreter runs the numbers; the compiler (sm_90, no GPU needed) sees types and layouts."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm.model_executor.layers.fused_moe.ops._moe_sum_kernel import _moe_sum_kernel as k
for dt in ("bf16", "fp16", "fp32"):
    for bk, bh, delta in ((8, 1024, False), (1, 1024, False), (16, 512, False), (8, 1024, True), (1, 512, True)):
        cexp = {"BLOCK_K": bk, "BLOCK_H": bh, "HAS_DELTA": delta, "USE_PDL": False}
        sig = {n: ("*" + dt) if n in ("x_ptr", "out_ptr") else "*fp32" if n == "d_ptr" else
               "constexpr" if n in cexp else "i32" for n in k.arg_names}
        src = ASTSource(k, sig, constexprs={(k.arg_names.index(n),): v for n, v in cexp.items()})
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        print("ok", dt, bk, bh, delta)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 15
