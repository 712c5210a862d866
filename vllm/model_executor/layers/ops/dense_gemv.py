"""The dense layers' projection at decode sizes: ``linear(x, weight, bias)`` = ``F.linear``, or on CUDA for at
most ``GEMV_MAX_TOKENS`` tokens a Triton FMA GEMV (``_dense_gemv_kernel.py``) that reads W once with enough
programs to keep every SM's loads in flight.

At one token cuBLAS reached ~40 % of the copy bandwidth on an H200 for the q/k/v projection of a Qwen3-30B-A3B
layer (12.4 us for 21 MB, docs/performance.md, fifth session), and the router's 0.5 MB GEMV took ~5 us plus a
split-K reduce; the batch-1 decode step spends ~260 us of ~1060 in these GEMVs.  ``GEMV_MAX_TOKENS`` is 0 (off)
until the GEMV is timed against cuBLAS (``benchmarks/kernels/benchmark_dense_gemv.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vllm.platforms.interface import triton_interpreting
from vllm.triton_utils import next_power_of_2

GEMV_MAX_TOKENS = 0  # off until timed on a GPU (see the module docstring)
GEMV_MAX_BLOCK_M = 8  # the kernel's rows per launch: one program holds every token's row
_NUM_SMS = 132  # H100 SXM and H200
_MIN_PROGRAMS = 2 * _NUM_SMS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DenseGemvConfig:
    block_n: int  # rows of W (output columns) per program
    block_k: int  # K per step
    num_warps: int = 4


def dense_gemv_config(N: int, K: int, dtype: torch.dtype) -> DenseGemvConfig:
    """BLOCK_K: 1 KB of a W row per step (512 16-bit values); BLOCK_N: 16 rows, halved (down to 4) while the grid
    has fewer than two programs per SM.  Depends on N, K and the dtype only, never on the token count (a row's
    numbers then do not depend on the batch it runs in)."""
    bk = min(next_power_of_2(max(K, 16)), 256 if dtype == torch.float32 else 512)
    bn = 16
    while bn > 4 and -(-N // bn) < _MIN_PROGRAMS:
        bn //= 2
    if triton_interpreting():  # few, big programs: the interpreter pays per program and per step
        bn, bk = max(bn, min(next_power_of_2(max(N, 1)), 64)), min(next_power_of_2(max(K, 16)), 256)
    return DenseGemvConfig(block_n=bn, block_k=bk)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"dense_gemv: weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"dense_gemv: input {x.dtype} and weight {weight.dtype} must be one float dtype")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"dense_gemv: bias {tuple(bias.shape)} {bias.dtype} does not fit weight "
                         f"{tuple(weight.shape)} {weight.dtype}")


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               config: Optional[DenseGemvConfig] = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) through the Triton GEMV, for at most GEMV_MAX_BLOCK_M tokens."""
    from vllm.model_executor.layers.ops._dense_gemv_kernel import dense_gemv_kernel

    _check(x, weight, bias)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > GEMV_MAX_BLOCK_M:
        raise ValueError(f"dense_gemv takes at most {GEMV_MAX_BLOCK_M} tokens, got {M}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        cfg = config or dense_gemv_config(N, K, x.dtype)
        has_bias = bias is not None
        dense_gemv_kernel[(-(-N // cfg.block_n),)](
            x2, w, bias if has_bias else w, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=has_bias, EVEN_K=K % cfg.block_k == 0, BLOCK_M=max(1, next_power_of_2(M)),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return y.reshape(*x.shape[:-1], N)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, max_tokens: Optional[int] = None) -> bool:
    """Whether ``linear`` takes the GEMV: CUDA (or the interpreter when ``max_tokens`` is given), at most
    ``max_tokens`` (default GEMV_MAX_TOKENS) tokens, one 16-bit float dtype, a 2-D weight."""
    limit = GEMV_MAX_TOKENS if max_tokens is None else max_tokens
    if limit <= 0 or not (x.is_cuda or (max_tokens is not None and triton_interpreting())):
        return False
    K = x.shape[-1] if x.dim() else 0
    return (x.dim() > 0 and weight.dim() == 2 and x.numel() // max(K, 1) <= min(limit, GEMV_MAX_BLOCK_M)
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; at decode sizes on CUDA the GEMV (``gemv_applies``)."""
    if gemv_applies(x, weight):
        return dense_gemv(x, weight, bias)
    return F.linear(x, weight, bias)
