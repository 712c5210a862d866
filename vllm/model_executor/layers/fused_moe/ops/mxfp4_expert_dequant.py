"""MXFP4 expert weights -> dense float weights, for the large-batch path of the MXFP4 experts.

``dequantize_mxfp4_experts(blocks, scales, out, e0, e1)`` writes experts [e0, e1) of the layer's
blocks (uint8 [E, N, K/32, 16] or [E, N, K/2]) and e8m0 scales (uint8 [E, N, K/32]) as dense
[e1 - e0, N, K] weights in ``out.dtype``, bit for bit ``dequantize_mxfp4`` (``mxfp4_dequant.py``:
exact in float32, one rounding to the dtype), so that the bf16 grouped GEMM can multiply them.
The Triton kernel is memory bound (reads 4.25 bits a weight, writes the dtype's bytes), one launch.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.int4_dequant import check_expert_range
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import MXFP4_BLOCK, dequantize_mxfp4
from vllm.platforms.interface import triton_interpreting

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize_mxfp4_experts(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, e0: int = 0,
                             e1: Optional[int] = None, *, use_triton: Optional[bool] = None, block_n: int = 32,
                             block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """Write experts [e0, e1) densely into ``out`` [e1 - e0, N, K] (any strides); returns ``out``.

    ``use_triton``: None = the Triton kernel on CUDA, torch elsewhere; True on CPU tensors needs
    TRITON_INTERPRET=1.  Both give identical bits.  ``block_n`` / ``block_k``: the tile (powers of
    two, block_k >= 32), for tuning.
    """
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import as_packed_rows

    q = as_packed_rows(blocks)
    if q.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {q.dtype} and {scales.dtype}")
    E, N, half_k = q.shape
    K = 2 * half_k
    if K % MXFP4_BLOCK or tuple(scales.shape) != (E, N, K // MXFP4_BLOCK) or scales.stride(2) != 1:
        raise ValueError(f"scales must be [{E}, {N}, {K // MXFP4_BLOCK}] with contiguous rows for blocks "
                         f"{tuple(blocks.shape)}, got {tuple(scales.shape)}")
    e1 = check_expert_range(e0, e1, E)
    if tuple(out.shape) != (e1 - e0, N, K) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out must be a float16/bfloat16/float32 [{e1 - e0}, {N}, {K}] tensor "
                         f"(experts [{e0}, {e1}), N, K), got {out.dtype} {tuple(out.shape)}")
    if out.device != q.device or scales.device != q.device:
        raise ValueError(f"blocks, scales and out must share a device, got {q.device}, {scales.device}, {out.device}")
    if use_triton is None:
        use_triton = out.is_cuda
    if not use_triton:
        out.copy_(dequantize_mxfp4(q[e0:e1].unflatten(2, (K // MXFP4_BLOCK, MXFP4_BLOCK // 2)), scales[e0:e1],
                                   out.dtype))
        return out
    if e1 == e0 or N == 0:
        return out
    if (N - 1) * abs(out.stride(1)) + (K - 1) * abs(out.stride(2)) >= 2**31:
        raise ValueError(f"one expert's [{N}, {K}] output spans 2**31 elements or more: offsets inside it are int32")
    if block_k < MXFP4_BLOCK or block_k & (block_k - 1) or block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n}, block_k={block_k}: powers of two, block_k >= 32")

    from vllm.model_executor.layers.fused_moe.ops._float_round import out_kind, storage_view
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_dequant_kernel import _mxfp4_dequant_kernel

    if triton_interpreting():  # ~ms per program in the interpreter: whole-matrix tiles
        block_n, block_k = max(1, min(128, 1 << (N - 1).bit_length())), max(32, min(256, 1 << (K - 1).bit_length()))
    grid = (-(-N // block_n), -(-K // block_k), e1 - e0)
    _mxfp4_dequant_kernel[grid](
        q, scales, storage_view(out), e0, N, K,
        q.stride(0), q.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        OUT_KIND=out_kind(out.dtype),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
