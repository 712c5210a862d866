"""The dense layers' projection at decode sizes: ``linear(x, weight, bias)`` = ``F.linear``, or on CUDA for at
most ``GEMV_MAX_TOKENS`` tokens a Triton FMA GEMV (``_dense_gemv_kernel.py``) that reads W once.

H200, one token, CUDA-graph replay with the L2 flushed (``benchmarks/kernels/benchmark_dense_gemv.py``, twelfth
session, docs/performance.md): cuBLAS / GEMV 1.03-1.34x on the q/k/v, o and router projections of Qwen3-30B-A3B,
Mixtral-8x7B and gpt-oss-20b (router 8.5 -> 6.3 us, o 12.9 -> 11.5 us on Qwen3) and 1.04x on the Qwen3 LM head;
the batch-1 decode step (12 layers, graphs) 1.08 -> 1.01 ms in one A/B.  From two tokens on the GEMV loses
(each token adds its own reductions: 0.62-0.88x at 2 tokens with the first tiles), so ``GEMV_MAX_TOKENS`` is 1.
A CUDA graph's batch is padded to its ladder size, and with a size of 1 in the ladder an eager single-token step
and its graph take the same path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2

GEMV_MAX_TOKENS = 1  # one token: the H200 A/B above
GEMV_MAX_BLOCK_M = 8  # the kernel's rows per launch: one program holds every token's row
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


GEMV_DELAYED = False  # dense_gemv_delayed_kernel (per-token partials reduced once; <= 4 tokens): untimed
DELAYED_MAX_BLOCK_M = 4


@dataclass(frozen=True)
class DenseGemvConfig:
    block_n: int  # rows of W (output columns) per program
    block_k: int  # K per step
    num_warps: int = 4
    delayed: bool = False  # the kernel that reduces each token's partial products once (<= 4 tokens)


def dense_gemv_config(N: int, K: int, dtype: torch.dtype) -> DenseGemvConfig:
    """4 rows of W per program, 1024 16-bit values of K per step (256 fp32), 8 warps: the fastest of a 24-tile
    sweep at one token on an H200 for the o and router projections (docs/performance.md, twelfth session).
    Depends on N, K and the dtype only, never on the token count (a row's numbers then do not depend on the
    batch it runs in)."""
    if triton_interpreting():  # few, big programs: the interpreter pays per program and per step
        return DenseGemvConfig(block_n=min(next_power_of_2(max(N, 1)), 64),
                               block_k=min(next_power_of_2(max(K, 16)), 256))
    bk = min(next_power_of_2(max(K, 16)), 256 if dtype == torch.float32 else 1024)
    return DenseGemvConfig(block_n=4, block_k=bk, num_warps=8, delayed=GEMV_DELAYED)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"dense_gemv: weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"dense_gemv: input {x.dtype} and weight {weight.dtype} must be one float dtype")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"dense_gemv: bias {tuple(bias.shape)} {bias.dtype} does not fit weight "
                         f"{tuple(weight.shape)} {weight.dtype}")


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               config: Optional[DenseGemvConfig] = None,
               lora_shrink: Optional[PendingDelta] = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) through the Triton GEMV, for at most GEMV_MAX_BLOCK_M tokens.
    ``lora_shrink``: the same launch also writes the LoRA shrink of x (``pending_delta.py``; not with the delayed
    kernel, which leaves ``lora_shrink.part`` unset)."""
    from vllm.model_executor.layers.ops._dense_gemv_kernel import dense_gemv_delayed_kernel, dense_gemv_kernel

    _check(x, weight, bias)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = config or dense_gemv_config(N, K, x.dtype)
    limit = DELAYED_MAX_BLOCK_M if cfg.delayed else GEMV_MAX_BLOCK_M
    if M > limit:
        raise ValueError(f"dense_gemv{' (delayed)' if cfg.delayed else ''} takes at most {limit} tokens, got {M}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        has_bias = bias is not None
        kernel = dense_gemv_delayed_kernel if cfg.delayed else dense_gemv_kernel
        tiles, extra, shrink_programs = -(-N // cfg.block_n), {}, 0
        if lora_shrink is not None and not cfg.delayed:
            lora_shrink.check(M, x.device)
            shrink_programs, extra = lora_shrink.shrink_kernel_args(M, K, x2.device)
            extra.pop("n_norm", None)
            extra.update(n_tiles=tiles)
        kernel[(tiles + shrink_programs,)](
            x2, w, bias if has_bias else w, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=has_bias, EVEN_K=K % cfg.block_k == 0, BLOCK_M=max(1, next_power_of_2(M)),
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **pdl_launch_kwargs(x2.device),
            **extra)
    return y.reshape(*x.shape[:-1], N)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, max_tokens: Optional[int] = None) -> bool:
    """Whether ``linear`` takes the GEMV: CUDA (or the interpreter when ``max_tokens`` is given), at most
    ``max_tokens`` (default GEMV_MAX_TOKENS) tokens, one 16-bit float dtype, a 2-D weight."""
    limit = GEMV_MAX_TOKENS if max_tokens is None else max_tokens
    if limit <= 0 or not (x.is_cuda or (max_tokens is not None and triton_interpreting())):
        return False
    K = x.shape[-1] if x.dim() else 0
    most = DELAYED_MAX_BLOCK_M if GEMV_DELAYED else GEMV_MAX_BLOCK_M
    return (x.dim() > 0 and weight.dim() == 2 and x.numel() // max(K, 1) <= min(limit, most)
            and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           lora_shrink: Optional[PendingDelta] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; at decode sizes on CUDA the GEMV (``gemv_applies``), which also writes
    ``lora_shrink``'s shrink of x (``lora_shrink.part`` stays None where it does not)."""
    if gemv_applies(x, weight):
        return dense_gemv(x, weight, bias, lora_shrink=lora_shrink)
    return F.linear(x, weight, bias)
