"""The 4-bit experts' tensor-core words -> dense float weights, for the dequant path (``dequant_path.py``).

When the tensor-core copy is the only one kept (``Int4MmaWeight`` / ``Mxfp4MmaWeight``), the large-batch path
dequantises from those words.  ``dequantize_mma_words`` writes experts [e0, e1) of them as dense
[e1 - e0, N, K] weights in ``out.dtype`` with one Triton launch (``_w4_mma_dequant_kernel.py``), bit for bit
the values of ``Int4PackedWeight.dequantize_expert`` (int4) or ``dequantize_mxfp4`` (MXFP4).  Memory bound:
half a byte a weight read, the dtype's bytes written.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import _FLOAT_DTYPES, _pow2_at_least
from vllm.model_executor.layers.fused_moe.ops.int4_dequant import check_expert_range
from vllm.platforms.interface import triton_interpreting

#: the kernel's default order: "words" (1.5-1.8x faster than "element" on an H200, twenty-first session:
#: benchmarks/kernels/benchmark_w4_dequant.py --orders element words); an int4 group under 16 inputs falls back
#: to "element", which decodes any group
ORDER = "words"
#: the default tile (block_n, block_k) per order: the fastest or within 1 % of it at Mixtral, Qwen3 and gpt-oss
#: widths on an H200 (twenty-first session, docs/performance.md)
DEFAULT_TILES = {"element": (64, 128), "words": (64, 256)}


def dequantize_mma_words(words: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, e0: int,
                         e1: Optional[int], *, mxfp4: bool, zeros: Optional[torch.Tensor] = None,
                         group_size: int = 32, block_n: Optional[int] = None, block_k: Optional[int] = None,
                         num_warps: int = 4, order: Optional[str] = None) -> torch.Tensor:
    """Write experts [e0, e1) of ``words`` [E, N/16, K/64, 32, 4] int32 densely into ``out`` [e1 - e0, N, K].

    int4 (``mxfp4=False``): ``scales`` [E, G, N] (float), ``zeros`` [E, G, N] uint8 or None (symmetric: 8),
    ``group_size`` inputs per scale.  MXFP4: ``scales`` [E, K/32, N] uint8 e8m0.  On CPU tensors this needs
    TRITON_INTERPRET=1.  ``block_n`` / ``block_k``: the tile (powers of two; "words": multiples of 16 / 64), for
    tuning; None = the order's ``DEFAULT_TILES``.  ``order``: "element" (each output element gathers its word) or
    "words" (whole words decoded in their own order, then permuted; the int4 group must be at least 16); None =
    ``ORDER``, or "element" for an int4 group under 16."""
    from vllm.model_executor.layers.fused_moe.ops._float_round import out_kind, storage_view
    from vllm.model_executor.layers.fused_moe.ops._w4_mma_dequant_kernel import (
        _w4_mma_dequant_kernel,
        _w4_mma_dequant_words_kernel,
    )

    if words.dtype != torch.int32 or words.dim() != 5 or tuple(words.shape[3:]) != (32, 4) or not words.is_contiguous():
        raise ValueError(f"words must be contiguous int32 [E, N/16, K/64, 32, 4], got {words.dtype} "
                         f"{tuple(words.shape)}")
    E, N, K = words.shape[0], words.shape[1] * 16, words.shape[2] * 64
    e1 = check_expert_range(e0, e1, E)
    if tuple(out.shape) != (e1 - e0, N, K) or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out must be a float16/bfloat16/float32 [{e1 - e0}, {N}, {K}] tensor "
                         f"(experts [{e0}, {e1}), N, K), got {out.dtype} {tuple(out.shape)}")
    group = 32 if mxfp4 else group_size
    if scales.shape[0] != E or scales.shape[2] != N or scales.shape[1] * group < K or scales.stride(2) != 1:
        raise ValueError(f"scales must be [{E}, groups of {group} inputs, {N}] with contiguous rows, got "
                         f"{tuple(scales.shape)}")
    if mxfp4 and scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 scales must be uint8 e8m0, got {scales.dtype}")
    if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape or zeros.stride(2) != 1):
        raise ValueError("int4 zeros must be uint8 shaped like the scales, with contiguous rows")
    if (N - 1) * abs(out.stride(1)) + (K - 1) * abs(out.stride(2)) >= 2**31:
        raise ValueError(f"one expert's [{N}, {K}] weight spans 2**31 elements or more: offsets inside it are int32")
    if e1 == e0:
        return out
    if order is None:
        order = "element" if group < 16 else ORDER
    if order not in ("element", "words"):
        raise ValueError(f"order must be 'element' or 'words', got {order!r}")
    default_n, default_k = DEFAULT_TILES[order]
    block_n, block_k = block_n or default_n, block_k or default_k
    if order == "words" and (group < 16 or block_n % 16 or block_k % 64):
        raise ValueError(f"order 'words' needs groups of >= 16 inputs and tiles of 16 x 64 multiples, got group "
                         f"{group}, tile {block_n} x {block_k}")
    if triton_interpreting():  # ~ms per program in the interpreter: whole-matrix tiles
        block_n, block_k = _pow2_at_least(N, 16, 128), _pow2_at_least(K, 64, 512)
    grid = (-(-N // block_n), -(-K // block_k), e1 - e0)
    args = (words, scales, zeros if zeros is not None else scales, storage_view(out), e0, N, K,
            scales.stride(0), scales.stride(1),
            zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
            out.stride(0), out.stride(1), out.stride(2))
    flags = dict(MXFP4=mxfp4, GROUP_SIZE=group, HAS_ZEROS=zeros is not None,
                 ROUND_SCALES=not mxfp4 and scales.dtype != out.dtype, OUT_KIND=out_kind(out.dtype), num_warps=num_warps)
    if order == "words":
        _w4_mma_dequant_words_kernel[grid](*args, TILES_N=block_n // 16, CHUNKS_K=block_k // 64, **flags)
    else:
        _w4_mma_dequant_kernel[grid](*args, BLOCK_N=block_n, BLOCK_K=block_k, **flags)
    return out
