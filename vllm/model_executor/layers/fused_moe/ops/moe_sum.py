"""The top-k sum after GEMM2: out [M, H] = sum over k of x [M, top_k, H].

On CUDA one small Triton launch (one program per token and H-block, fp32 sum, one rounding) instead of
torch's general reduction, which costs several microseconds per MoE layer at decode; torch elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs

_BLOCK_H = 1024


def _launch_kwargs(device: torch.device, delta: Optional[torch.Tensor]) -> dict:
    """PDL unless a delta joins from another stream (see ``activation._launch_kwargs``)."""
    return pdl_launch_kwargs(device) if delta is None else {}


def moe_sum(x: torch.Tensor, out: torch.Tensor, *, use_triton: Optional[bool] = None,
            delta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Write sum(x, dim=1) into ``out`` and return it.  x: [M, top_k, H] float; out: [M, H], any strides.

    use_triton: None = Triton on CUDA, torch elsewhere; True on CPU needs TRITON_INTERPRET=1.
    delta: optional fp32 [M, top_k, H] (any strides) added to x first, each sum rounded to x's dtype: the
    same bits as ``x += delta`` in place (as the LoRA kernels add theirs) and then the sum.  x is not written."""
    if x.dim() != 3 or out.dim() != 2 or tuple(out.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"x must be [M, top_k, H] and out [M, H], got {tuple(x.shape)} and {tuple(out.shape)}")
    if delta is not None and (delta.dtype != torch.float32 or delta.shape != x.shape or delta.device != x.device):
        raise ValueError(f"delta must be fp32 {tuple(x.shape)} on {x.device}, got {delta.dtype} {tuple(delta.shape)} "
                         f"{delta.device}")
    if use_triton is None:
        use_triton = x.is_cuda
    if not use_triton:
        return torch.sum(x if delta is None else (x.float() + delta).to(x.dtype), dim=1, out=out)
    if not x.is_cuda and not triton_interpreting():
        raise ValueError("the Triton moe_sum needs a CUDA tensor or TRITON_INTERPRET=1")
    M, top_k, H = x.shape
    if M == 0 or H == 0:
        return out
    if top_k == 0:
        return out.zero_()
    from vllm.model_executor.layers.fused_moe.ops._moe_sum_kernel import _moe_sum_kernel
    from vllm.triton_utils import next_power_of_2

    block_k = next_power_of_2(top_k)
    block_h = min(_BLOCK_H, next_power_of_2(H), max(16, 8192 // block_k))
    d = x if delta is None else delta  # never read without HAS_DELTA
    _moe_sum_kernel[(M, -(-H // block_h))](x, out, H, top_k, *x.stride(), *out.stride(), d, *d.stride(),
                                           BLOCK_K=block_k, BLOCK_H=block_h, HAS_DELTA=delta is not None,
                                           **_launch_kwargs(x.device, delta))
    return out
