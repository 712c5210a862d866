"""The FMA GEMV of the bf16 / fp16 / fp32 expert GEMM for pairwise launches: launcher and tiles.

The same op as ``invoke_fused_moe_gemm`` (read its docstring) on the routing ``pairwise_alignment``
makes (a few pairs among many experts: decode of a fine-grained MoE), where each M-block holds one pair:

    out[p] = (a[p // top_k_in] @ w[e_p].T + bias[e_p]) * (topk_weights.flatten()[p] if mul_routed_weight)

with e_p = ``pair_expert_ids[p]`` (the pairwise alignment's ``block_expert_ids``); -1 skips the pair.
One program per (pair, BLOCK_SIZE_N columns, K split), FMAs in fp32, no tensor cores
(``_fused_moe_gemv_kernel.py``).  ``invoke_fused_moe_gemm`` runs it when its config has ``gemv=1`` and
its routing is pairwise; ``get_fused_moe_config`` gives pairwise launches ``gemv=1`` when
``fused_moe_gemm.GEMV_PAIRWISE`` is on (off until timed on a GPU: ``benchmarks/kernels/benchmark_moe_gemv.py``).

Graph-safe: no host reads of device values; with ``SPLIT_K > 1`` the fp32 partial-sum buffer is
allocated per call unless one is handed in, and one reduction launch adds the splits.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.kernel_configs.tile_config import TileConfig
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs

_NUM_SMS = 132  # H100 SXM and H200
# Programs the heuristic aims for (per SM): several programs' loads in flight hide the memory latency.
GEMV_PROGRAMS_PER_SM = 4
# BLOCK_SIZE_N 32 x BLOCK_SIZE_K 256 (bf16) holds 134 registers on sm_90, 3 programs per SM; 64 x 256 holds 246 (2)
GEMV_MAX_BLOCK_N, GEMV_MIN_BLOCK_N = 32, 8
GEMV_TILE_ELEMENTS = 4096  # weights per program and K-step (BLOCK_SIZE_N * BLOCK_SIZE_K): 8 KB of bf16
GEMV_WARPS = 4


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def gemv_config(num_pairs: int, N: int, K: int, dtype: torch.dtype, block_size_m: int = 16) -> TileConfig:
    """The GEMV's tiles for a pairwise launch of ``num_pairs`` pairs: BLOCK_SIZE_N halves from 32 (to 8)
    until the grid has ``GEMV_PROGRAMS_PER_SM`` programs per SM, BLOCK_SIZE_K fills ``GEMV_TILE_ELEMENTS``
    weights per K-step (at least 256; 128 in fp32: 16-byte loads either way), and K is split (fp32
    partial sums, one reduction launch) only where even 8-column tiles leave the grid short.
    ``block_size_m`` is the alignment's block size (the pairwise alignment takes any)."""
    if triton_interpreting():  # ~5 ms per loop iteration per program: few, big tiles
        return TileConfig(block_size_m=block_size_m, block_size_n=_pow2_at_least(N, 16, 128),
                          block_size_k=_pow2_at_least(K, 16, 128), num_warps=4, num_stages=1, gemv=1)
    target = GEMV_PROGRAMS_PER_SM * _NUM_SMS
    bn = min(GEMV_MAX_BLOCK_N, _pow2_at_least(N, 1, GEMV_MAX_BLOCK_N))
    while bn > GEMV_MIN_BLOCK_N and num_pairs * -(-N // bn) < target:
        bn //= 2
    min_bk = 128 if dtype == torch.float32 else 256
    bk = min(max(min_bk, GEMV_TILE_ELEMENTS // bn), _pow2_at_least(K, 16, 1024))
    split, k_tiles = 1, K // bk
    while num_pairs * -(-N // bn) * split < target and split * 2 <= min(8, k_tiles // 2):
        split *= 2
    return TileConfig(block_size_m=block_size_m, block_size_n=bn, block_size_k=bk, split_k=split,
                      num_warps=GEMV_WARPS, num_stages=1, gemv=1)


def check_gemv_config(config: TileConfig) -> None:
    """What the GEMV needs of a ``gemv=1`` config: power-of-two BLOCK_SIZE_N / BLOCK_SIZE_K (any size: no
    tl.dot), SPLIT_K 1-16."""
    for name in ("block_size_n", "block_size_k"):
        v = getattr(config, name)
        if v & (v - 1):
            raise ValueError(f"{name.upper()}={v}: the GEMV's tiles must be powers of two")
    if config.split_k > 16:
        raise ValueError(f"SPLIT_K={config.split_k}: the GEMV splits K at most 16 ways")


def invoke_fused_moe_gemv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, pair_expert_ids: torch.Tensor,
                          top_k_in: int, config: TileConfig, topk_weights: Optional[torch.Tensor] = None,
                          mul_routed_weight: bool = False, bias: Optional[torch.Tensor] = None,
                          split_buffer: Optional[torch.Tensor] = None) -> None:
    """Write ``out[p]`` for every pair p with an expert (see the module docstring).

    Arguments as ``invoke_fused_moe_gemm`` (which checks them fully and calls this), with ``pair_expert_ids``
    [num_pairs] contiguous int32 instead of an alignment.  Rows of pairs whose expert is -1: zeros with
    ``config.split_k > 1``, untouched otherwise.  ``split_buffer``: fp32, at least split_k * num_pairs * N
    elements (allocated when None or too small).
    """
    check_gemv_config(config)
    if a.dim() != 2 or w.dim() != 3 or out.dim() != 2:
        raise ValueError(f"expected a 2-D, w 3-D, out 2-D; got {a.dim()}, {w.dim()}, {out.dim()}")
    E, N, K = w.shape
    num_pairs = out.shape[0]
    if a.shape[1] != K or out.shape[1] != N or top_k_in < 1 or a.shape[0] * top_k_in != num_pairs:
        raise ValueError(f"a [rows, {K}] with rows * top_k_in = out's {num_pairs} rows and out [pairs, {N}] expected; "
                         f"got a {tuple(a.shape)}, top_k_in {top_k_in}, out {tuple(out.shape)}")
    if pair_expert_ids.numel() != num_pairs or pair_expert_ids.dtype != torch.int32 \
            or not pair_expert_ids.is_contiguous():
        raise ValueError(f"pair_expert_ids must be contiguous int32 with {num_pairs} values")
    if mul_routed_weight and (topk_weights is None or topk_weights.numel() != num_pairs):
        raise ValueError(f"mul_routed_weight=True needs topk_weights with {num_pairs} values")
    if num_pairs == 0 or N == 0:
        return
    from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemv_kernel import _fused_moe_gemv_kernel
    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import _split_k_reduce_kernel

    bn, bk, split = config.block_size_n, config.block_size_k, config.split_k
    if split > 1:
        need = split * num_pairs * N
        if split_buffer is None or split_buffer.numel() < need or split_buffer.dtype != torch.float32:
            split_buffer = torch.empty(need, dtype=torch.float32, device=a.device)
        target = split_buffer[:need].view(split, num_pairs, N)
        t_strides = (target.stride(0), target.stride(1), target.stride(2))
    else:
        target, t_strides = out, (0, out.stride(0), out.stride(1))
    weights = topk_weights.reshape(-1) if mul_routed_weight else out  # dummy pointer when unused
    bias_arg = bias if bias is not None else out
    grid = (num_pairs * -(-N // bn), split)
    _fused_moe_gemv_kernel[grid](
        a_ptr=a, w_ptr=w, out_ptr=target, bias_ptr=bias_arg, topk_weights_ptr=weights,
        pair_expert_ids_ptr=pair_expert_ids, N=N, K=K, top_k_in=top_k_in,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_we=w.stride(0), stride_wn=w.stride(1), stride_wk=w.stride(2),
        stride_os=t_strides[0], stride_om=t_strides[1], stride_on=t_strides[2],
        stride_be=bias.stride(0) if bias is not None else 0, stride_bn=bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, SPLIT_K=split,
        BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl_launch_kwargs(a.device),
    )
    if split > 1:  # one launch: add the splits, cast, store into out (any strides)
        block = 1024
        _split_k_reduce_kernel[(-(-out.numel() // block),)](
            target, out, out.shape[0], out.shape[1], target.stride(0), target.stride(1), out.stride(0),
            out.stride(1), SPLIT_K=split, ROWS=1, ACT=-1, BLOCK=block, **pdl_launch_kwargs(target.device))
