"""Packed int4 expert weights -> dense float weights, for the large-batch path of the int4 experts.

``dequantize_int4_experts(w, out, e0, e1)`` writes experts [e0, e1) of an ``Int4PackedWeight``
(``int4_weights.py``) as dense [e1 - e0, N, K] weights in ``out.dtype``, so that the bf16 grouped
GEMM (``fused_moe_gemm.py``) can multiply them:

    out[e - e0, n, perm[e, j]] = scales[e, g(j), n] * (q[e, n, j] - zeros[e, g(j), n])

j a stored input position, g(j) its group (``g_idx`` or j // group_size), perm the act-order
permutation (identity without one): the dense weight multiplies the activations in their own
order, as the in-register kernel's ``a[perm[j]]`` does.  The values are bit for bit those of
``Int4PackedWeight.dequantize_expert`` (exact difference, the scale rounded to the dtype, one
rounding of the product).  Memory bound: reads half a byte a weight (plus scales), writes the
dtype's bytes; one launch.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import _FLOAT_DTYPES, _pow2_at_least
from vllm.platforms.interface import triton_interpreting

def check_expert_range(e0: int, e1: Optional[int], num_experts: int) -> int:
    """Validate [e0, e1) against ``num_experts`` (e1 None: to the last expert); returns e1."""
    e1 = num_experts if e1 is None else e1
    if not 0 <= e0 <= e1 <= num_experts:
        raise ValueError(f"expert range [{e0}, {e1}) is not inside [0, {num_experts})")
    return e1


def dequantize_int4_experts(w: Int4PackedWeight, out: torch.Tensor, e0: int = 0, e1: Optional[int] = None, *,
                            use_triton: Optional[bool] = None, block_n: int = 64,
                            block_k: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Write experts [e0, e1) of ``w`` densely into ``out`` [e1 - e0, N, K] (any strides); returns ``out``.

    ``use_triton``: None = the Triton kernel on CUDA, torch elsewhere; True on CPU tensors needs
    TRITON_INTERPRET=1.  Both give identical bits.  ``block_n`` / ``block_k``: the tile (powers of two;
    block_k >= 8), for tuning.
    """
    E, N, K = w.num_experts, w.n, w.k
    e1 = check_expert_range(e0, e1, E)
    if tuple(out.shape) != (e1 - e0, N, K) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out must be a float16/bfloat16/float32 [{e1 - e0}, {N}, {K}] tensor "
                         f"(experts [{e0}, {e1}), N, K), got {out.dtype} {tuple(out.shape)}")
    if out.device != w.qweight.device:
        raise ValueError(f"out is on {out.device}, the int4 weight on {w.qweight.device}")
    if use_triton is None:
        use_triton = out.is_cuda
    if not use_triton:
        return _dequantize_torch(w, out, e0, e1)
    if e1 == e0 or N == 0:
        return out
    if w.qweight.dtype != torch.int32 or w.qweight.stride(2) != 1 or w.scales.stride(2) != 1:
        raise ValueError("the int4 weight must be packed by Int4MoEMethod (int32 words, contiguous rows)")
    if w.zeros is not None and (w.zeros.dtype != torch.uint8 or w.zeros.stride(2) != 1):
        raise ValueError("int4 zeros must be uint8 [E, G, N], contiguous rows")
    for name, t in (("g_idx", w.g_idx), ("perm", w.perm)):
        if t is not None and (tuple(t.shape) != (E, K) or t.dtype != torch.int32 or t.stride(1) != 1):
            raise ValueError(f"{name} must be int32 [{E}, {K}] with contiguous rows, got {t.dtype} {tuple(t.shape)}")
    if w.g_idx is not None and w.perm is not None and w.g_idx.stride(0) != w.perm.stride(0):
        raise ValueError("g_idx and perm must share their expert stride")
    if (N - 1) * abs(out.stride(1)) + (K - 1) * abs(out.stride(2)) >= 2**31:
        raise ValueError(f"one expert's [{N}, {K}] output spans 2**31 elements or more: offsets inside it are int32")
    if block_k < 8 or block_k & (block_k - 1) or block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n}, block_k={block_k}: powers of two, block_k >= 8")

    from vllm.model_executor.layers.fused_moe.ops._float_round import out_kind, storage_view
    from vllm.model_executor.layers.fused_moe.ops._int4_dequant_kernel import _int4_dequant_kernel

    if triton_interpreting():  # ~ms per program in the interpreter: whole-matrix tiles
        block_n, block_k = _pow2_at_least(N, 16, 128), _pow2_at_least(K, 16, 256)
    dummy = w.qweight
    side = w.g_idx if w.g_idx is not None else w.perm
    grid = (-(-N // block_n), -(-K // block_k), e1 - e0)
    _int4_dequant_kernel[grid](
        w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.g_idx if w.g_idx is not None else dummy, w.perm if w.perm is not None else dummy,
        storage_view(out), e0, N, K,
        w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0), w.scales.stride(1),
        w.zeros.stride(0) if w.zeros is not None else 0, w.zeros.stride(1) if w.zeros is not None else 0,
        side.stride(0) if side is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        GROUP_SIZE=w.group_size,
        HAS_ZEROS=w.zeros is not None,
        HAS_G_IDX=w.g_idx is not None,
        HAS_PERM=w.perm is not None,
        ROUND_SCALES=w.scales.dtype != out.dtype,
        OUT_KIND=out_kind(out.dtype),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


def _dequantize_torch(w: Int4PackedWeight, out: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
    """The reference: ``dequantize_expert`` per expert, columns scattered through ``perm``."""
    for e in range(e0, e1):
        dense = w.dequantize_expert(e, out.dtype)
        if w.perm is not None:
            out[e - e0].index_copy_(1, w.perm[e].long(), dense)
        else:
            out[e - e0].copy_(dense)
    return out
