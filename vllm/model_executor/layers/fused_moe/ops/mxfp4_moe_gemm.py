"""Grouped expert GEMM on MXFP4 weights: launcher, tile config, fp32 reference.

The same op as ``fused_moe_gemm.invoke_fused_moe_gemm`` (read its docstring), with
the weight given as MXFP4 codes and scales instead of a float tensor:

    out[p] = (a[p // top_k_in] @ W[e_p].T + bias[e_p]) * (topk_weights.flatten()[p] if mul_routed_weight)
    W[e] = dequantize_mxfp4(blocks[e], scales[e])              [N, K], never materialised

blocks uint8 [E_local, N, K/32, 16] (or its view [E_local, N, K/2]), scales uint8
[E_local, N, K/32].  The kernel reads 4.25 bits per weight and decodes in registers.

Tiles: decode (few pairs per expert) takes BLOCK_SIZE_M 16 and narrow N tiles so
that one token's handful of experts still spreads over the SMs; the weight bytes
are read once per M-block, so larger batches take taller M-blocks.

Split-K (config ``split_k`` > 1; 1 unless a tuned file says otherwise, ``auto_split_k`` gives
the value that fills the GPU twice): the K loop is shared by SPLIT_K programs writing fp32
partial sums (``split_buffer``, or a fresh tensor), and one reduction launch adds them with the
bias and the router weight.  Graph-safe: no host reads of device values.

GEMV (config ``gemv=1``, ``_mxfp4_gemv_kernel.py``): at decode sizes (at most ``GEMV_MAX_TOKENS``
tokens, or ``GEMV_SPREAD_MAX_TOKENS`` spread over distinct experts) the heuristic gives the FMA GEMV, which walks the
real rows of each M-block with fp32 FMAs instead of tensor-core dots (same routing, same ``out``
contract, same split-K reduction).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from vllm import envs
from vllm.kernel_configs.tile_config import Mxfp4TileConfig, tuned_tiles
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import MXFP4_BLOCK, dequantize_mxfp4
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import check_pair_routing, pairs_per_touched_expert
from vllm.platforms import current_platform
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import PDL_4BIT, pdl_launch_kwargs

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUM_SMS = 132  # H100 SXM and H200
# One-token launches run the FMA GEMV with one row per pass: on an H200 (bf16, checked against the dot
# kernel first) gpt-oss-20b 61.2 vs 89.8 us and -120b 62.1 vs 89.4 us at 1 token; at 16 tokens it loses
# (1 row per pass 0.59-0.69x, 2 rows 0.75-0.81x), so larger launches keep the dot kernel (2-15 tokens are
# untimed).  ``gemv=True`` / a tuned ``GEMV`` entry force it; GEMV_DECODE = False turns the heuristic's off.
GEMV_DECODE = True
GEMV_MAX_TOKENS = 1
# ... and launches of up to GEMV_SPREAD_MAX_TOKENS tokens whose pairs spread over distinct experts (expected
# pairs per touched expert <= GEMV_SPREAD_MAX_ROWS: the one-row GEMV reads an expert once per pair, the dot
# kernel once).  H200, 4 tokens (twelfth session, benchmark_moe_mxfp4.py --variants gemv): gpt-oss-120b (128
# experts, 1.06 pairs per touched expert) 142.0 vs 218.3 us; gpt-oss-20b (32 experts, 1.24) 204.4 vs 201.1
GEMV_SPREAD_MAX_TOKENS, GEMV_SPREAD_MAX_ROWS = 4, 1.08
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS, GEMV_PROGRAMS_PER_SM = 256, 64, 2, 8


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


@functools.lru_cache(maxsize=1024)
def _cached_config(num_pairs: int, num_experts: int, N: int, K: int, top_k: int, dtype: torch.dtype, interp: bool,
                   tuned_folder: Optional[str], gemv: Optional[bool]) -> Mxfp4TileConfig:
    per_expert = num_pairs / max(1, min(num_pairs, num_experts))
    if gemv is None:
        gemv = GEMV_DECODE and not interp and (num_pairs <= GEMV_MAX_TOKENS * max(top_k, 1) or (
            num_pairs <= GEMV_SPREAD_MAX_TOKENS * max(top_k, 1)
            and pairs_per_touched_expert(num_pairs, num_experts) <= GEMV_SPREAD_MAX_ROWS))
    if gemv:
        cfg = _gemv_config(num_pairs, num_experts, N, K, interp, rows=1 if per_expert <= 1 else 2)
        return tuned_tiles(cfg, "mxfp4_moe_gemm", {"E": num_experts, "N": N, "K": K},
                           max(num_pairs // max(top_k, 1), 1), current_platform().device_name(),
                           check=check_mxfp4_tile_config) if not interp else cfg
    if interp:  # few, large programs: the interpreter pays per program and per loop step
        return Mxfp4TileConfig(block_size_m=_pow2_at_least(num_pairs, 16, 64), block_size_n=_pow2_at_least(N, 16, 128),
                               block_size_k=_pow2_at_least(K, 32, 256), num_warps=4, num_stages=1)
    # (block_size_m, block_size_n, block_size_k, group_size_m, num_warps, num_stages)
    if per_expert <= 16:
        bm, bn, bk, gm, warps, stages = 16, 64, 128, 1, 4, 4
    elif per_expert <= 64:
        bm, bn, bk, gm, warps, stages = 32, 128, 128, 8, 4, 3
    else:
        bm, bn, bk, gm, warps, stages = 64, 128, 128, 8, 8, 3
    if dtype == torch.float32:
        bk = 64
    cfg = Mxfp4TileConfig(block_size_m=bm, block_size_n=min(bn, _pow2_at_least(N, 16, 256)),
                          block_size_k=min(bk, _pow2_at_least(K, 32, 256)), group_size_m=gm, num_warps=warps,
                          num_stages=stages)
    return tuned_tiles(cfg, "mxfp4_moe_gemm", {"E": num_experts, "N": N, "K": K},
                       max(num_pairs // max(top_k, 1), 1), current_platform().device_name(),
                       check=check_mxfp4_tile_config)


def _gemv_config(num_pairs: int, num_experts: int, N: int, K: int, interp: bool, rows: int = 1) -> Mxfp4TileConfig:
    """The FMA GEMV's tiles: [BLOCK_SIZE_N, BLOCK_SIZE_K / 8] code words per K-step decoded once for ``rows``
    rows (GEMV = 1 or 2), M-blocks of 16 rows (the alignment's; passes without a real row are skipped), K
    split until the grid has GEMV_PROGRAMS_PER_SM programs per SM (at least two K-tiles per split)."""
    if interp:
        return Mxfp4TileConfig(block_size_m=16, block_size_n=_pow2_at_least(N, 16, 64),
                               block_size_k=_pow2_at_least(K, 32, 128), num_warps=4, num_stages=1, gemv=rows)
    bn = min(GEMV_BLOCK_N, _pow2_at_least(N, 16, 256))
    bk = min(GEMV_BLOCK_K, _pow2_at_least(K, 32, 256))
    tiles = (-(-num_pairs // 16) + min(num_pairs, num_experts)) * -(-N // bn)
    k_tiles, split = -(-K // bk), 1
    while tiles * split < GEMV_PROGRAMS_PER_SM * _NUM_SMS and split * 2 <= min(16, k_tiles // 2):
        split *= 2
    return Mxfp4TileConfig(block_size_m=16, block_size_n=bn, block_size_k=bk, split_k=split, num_warps=GEMV_WARPS,
                           num_stages=1, gemv=rows)


def check_mxfp4_tile_config(config: Mxfp4TileConfig) -> None:
    """What ``invoke_mxfp4_moe_gemm`` needs of a config: BLOCK_SIZE_M/N powers of two >= 16, BLOCK_SIZE_K a
    power of two >= 32 (whole scale groups), DECODE_ASM 0 or 1 (``TypeError`` for anything but a
    ``Mxfp4TileConfig``)."""
    if not isinstance(config, Mxfp4TileConfig):
        raise TypeError(f"config must be a Mxfp4TileConfig (get_mxfp4_moe_config, or Mxfp4TileConfig.from_json "
                        f"for a dict of BLOCK_SIZE_M, ...), got {type(config).__name__}")
    bm, bn, bk = config.block_size_m, config.block_size_n, config.block_size_k
    if bm < 16 or bm & (bm - 1) or bn < 16 or bn & (bn - 1) or bk < 32 or bk & (bk - 1):
        raise ValueError(f"config tiles {bm}x{bn}x{bk}: BLOCK_SIZE_M/N must be powers of two >= 16, "
                         "BLOCK_SIZE_K a power of two >= 32")
    if config.decode_asm not in (0, 1):
        raise ValueError(f"DECODE_ASM={config.decode_asm}: 1 (packed PTX decode where it runs) or 0 (portable)")
    if config.gemv not in (0, 1, 2):
        raise ValueError(f"GEMV={config.gemv}: 0 (tl.dot), or the FMA GEMV decoding each weight tile for 1 or 2 "
                         "rows at a time")


def auto_split_k(config: Mxfp4TileConfig, num_pairs: int, num_experts: int, N: int, K: int,
                 max_split: int = 8) -> int:
    """The SPLIT_K that lets the grid cover the GPU's SMs about twice (at most ``max_split``, and
    at least two K-tiles per split): the decode setting ``--split-k auto`` of the benchmark times."""
    bm, bn, bk = config.block_size_m, config.block_size_n, config.block_size_k
    tiles = (-(-num_pairs // bm) + min(num_pairs, num_experts)) * -(-N // bn)
    k_tiles = -(-K // bk)
    split = 1
    while tiles * split < 2 * _NUM_SMS and split * 2 <= min(max_split, k_tiles // 2):
        split *= 2
    return split


def get_mxfp4_moe_config(num_pairs: int, num_experts: int, N: int, K: int, top_k: int,
                         dtype: torch.dtype, gemv: Optional[bool] = None) -> Mxfp4TileConfig:
    """Tile config (tiles, GROUP_SIZE_M, warps, stages, SPLIT_K, DECODE_ASM 1, GEMV): a tuned file (op
    ``mxfp4_moe_gemm``, keys E, N, K, by token count) when one matches, else the heuristic; an entry with
    an unknown key or a value ``check_mxfp4_tile_config`` rejects is an error naming the file.

    ``gemv`` None: the heuristic's choice (the FMA GEMV at decode sizes on a GPU, see ``GEMV_DECODE``);
    True / False: the GEMV's / the dot kernel's config.
    block_size_m is the block size to pass to ``moe_align_block_size``.
    """
    key = (int(num_pairs), int(num_experts), int(N), int(K), int(top_k), dtype)
    return _cached_config(*key, triton_interpreting(), envs.VLLM_TUNED_CONFIG_FOLDER, gemv)


def use_decode_asm(dtype: torch.dtype, config: Mxfp4TileConfig) -> bool:
    """Whether the kernel decodes with its packed PTX (bf16 activations on CUDA, unless the config
    says ``decode_asm=0``); otherwise it decodes with portable Triton arithmetic."""
    return dtype == torch.bfloat16 and not triton_interpreting() and bool(config.decode_asm)


def as_packed_rows(blocks: torch.Tensor) -> torch.Tensor:
    """blocks [E, N, K/32, 16] (or already [E, N, K/2]) -> the [E, N, K/2] byte view the kernel reads."""
    if blocks.dim() == 4:
        blocks = blocks.flatten(2)
    if blocks.dim() != 3 or blocks.stride(2) != 1:
        raise ValueError(f"MXFP4 blocks must be [E, N, K/32, 16] or [E, N, K/2] with contiguous rows, "
                         f"got shape {tuple(blocks.shape)} strides {blocks.stride()}")
    return blocks


def invoke_mxfp4_moe_gemm(
    a: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    *,
    sorted_token_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    top_k_in: int,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
    bias: Optional[torch.Tensor] = None,
    config: Mxfp4TileConfig,
    split_buffer: Optional[torch.Tensor] = None,
) -> None:
    """Write ``out[p] = (a[p // top_k_in] @ W[e_p].T + bias[e_p]) * weight_p`` for every routed pair p.

    a: [num_rows, K] fp16/bf16/fp32.  blocks: uint8 [E_local, N, K/32, 16] or [E_local, N, K/2];
    scales: uint8 [E_local, N, K/32].  Everything else as ``invoke_fused_moe_gemm``.
    ``config.split_k > 1``: fp32 partial sums in ``split_buffer`` (at least SPLIT_K * num_pairs * N
    float32 elements; allocated if None), added by a second launch.
    """
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import (
        _mxfp4_moe_gemm_kernel,
        _mxfp4_split_k_reduce_kernel,
    )

    q = as_packed_rows(blocks)
    check_mxfp4_tile_config(config)
    bm, bn, bk, split = config.block_size_m, config.block_size_n, config.block_size_k, config.split_k
    if a.dim() != 2 or out.dim() != 2:
        raise ValueError(f"expected a and out 2-D, got {a.dim()} and {out.dim()}")
    if a.dtype not in _FLOAT_DTYPES or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"a and out must be fp16/bf16/fp32, got {a.dtype} and {out.dtype}")
    if q.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {q.dtype} and {scales.dtype}")
    E, N, half_k = q.shape
    K = a.shape[1]
    if K % MXFP4_BLOCK or half_k * 2 != K:
        raise ValueError(f"a has K={K}, the MXFP4 weight holds {half_k * 2} per row; K must be a multiple of 32")
    if tuple(scales.shape) != (E, N, K // MXFP4_BLOCK) or scales.stride(2) != 1:
        raise ValueError(f"scales must be [{E}, {N}, {K // MXFP4_BLOCK}] with contiguous rows, "
                         f"got {tuple(scales.shape)}")
    num_pairs = a.shape[0] * top_k_in
    EM = check_pair_routing(out, num_pairs, N, E, bm, sorted_token_ids=sorted_token_ids,
                            block_expert_ids=block_expert_ids, num_tokens_post_padded=num_tokens_post_padded,
                            topk_weights=topk_weights, mul_routed_weight=mul_routed_weight, bias=bias,
                            others=(a, q, scales))
    if num_pairs == 0 or N == 0 or EM == 0:
        return
    weights = topk_weights.reshape(-1) if mul_routed_weight else out
    bias_arg = bias if bias is not None else out
    num_pid_m = min(EM // bm, -(-num_pairs // bm) + min(num_pairs, E))
    if split > 1:
        need = split * num_pairs * N
        if split_buffer is None or split_buffer.numel() < need or split_buffer.dtype != torch.float32 \
                or split_buffer.device != out.device or not split_buffer.is_contiguous():
            split_buffer = torch.empty(need, dtype=torch.float32, device=out.device)
        target, t_strides = split_buffer, (num_pairs * N, N, 1)  # part[s, pair, n], contiguous
    else:
        target, t_strides = out, (0, out.stride(0), out.stride(1))
    grid = (num_pid_m * -(-N // bn), split)
    if config.gemv:
        _launch_gemv(grid, a, q, scales, target, t_strides, bias, bias_arg, weights, sorted_token_ids,
                     block_expert_ids, num_tokens_post_padded, num_pairs, top_k_in, mul_routed_weight, config)
    else:
        _mxfp4_moe_gemm_kernel[grid](
            a, q, scales, target, bias_arg, weights,
            sorted_token_ids, block_expert_ids, num_tokens_post_padded,
            N, K, num_pid_m, num_pairs, top_k_in,
            a.stride(0), a.stride(1),
            q.stride(0), q.stride(1), scales.stride(0), scales.stride(1),
            *t_strides,
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
            HAS_BIAS=bias is not None,
            MUL_ROUTED_WEIGHT=mul_routed_weight,
            DOT_F32=a.dtype == torch.float32 or triton_interpreting(),
            DECODE_ASM=use_decode_asm(a.dtype, config),
            EVEN_K=K % bk == 0,
            BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
            GROUP_SIZE_M=config.group_size_m,
            SPLIT_K=split,
            num_warps=config.num_warps,
            num_stages=config.num_stages, **pdl_launch_kwargs(a.device, enabled=PDL_4BIT),
        )
    if split > 1:  # one launch over the same blocks: shares + bias, times the router weight, into out
        block_n = 128
        _mxfp4_split_k_reduce_kernel[(num_pid_m, -(-N // block_n))](
            target, out, bias_arg, weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
            N, num_pairs, out.stride(0), out.stride(1),
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
            HAS_BIAS=bias is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, SPLIT_K=split, BLOCK_SIZE_M=bm,
            BLOCK_N=block_n, num_warps=4, **pdl_launch_kwargs(target.device, enabled=PDL_4BIT))


def _launch_gemv(grid: tuple, a: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
                 t_strides: tuple, bias: Optional[torch.Tensor], bias_arg: torch.Tensor, weights: torch.Tensor,
                 sorted_token_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                 num_tokens_post_padded: torch.Tensor, num_pairs: int, top_k_in: int, mul_routed_weight: bool,
                 config: Mxfp4TileConfig) -> None:
    """The FMA GEMV (``_mxfp4_gemv_kernel.py``) on the same grid, reading the code bytes as int32 words."""
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_gemv_kernel import _mxfp4_gemv_kernel

    if q.data_ptr() % 4 or q.stride(0) % 4 or q.stride(1) % 4:
        raise ValueError(f"the MXFP4 GEMV (GEMV=1) reads the code bytes as int32 words: their rows must start "
                         f"at multiples of 4 bytes (got strides {q.stride()}, offset {q.storage_offset()}); "
                         f"use GEMV=0 for this weight")
    K = a.shape[1]
    _mxfp4_gemv_kernel[grid](
        a, q, scales, target, bias_arg, weights, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
        q.shape[1], K, num_pairs, top_k_in, a.stride(0), a.stride(1), q.stride(0), q.stride(1),
        scales.stride(0), scales.stride(1), *t_strides,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, EVEN_K=K % config.block_size_k == 0,
        DECODE_ASM=bool(config.decode_asm) and not triton_interpreting(),
        A_QUADS=a.dtype == torch.bfloat16 and a.stride(1) == 1 and a.stride(0) % 4 == 0 and a.data_ptr() % 8 == 0,
        BLOCK_SIZE_M=config.block_size_m, BLOCK_SIZE_N=config.block_size_n, BLOCK_SIZE_K=config.block_size_k,
        SPLIT_K=config.split_k, ROWS=config.gemv, num_warps=config.num_warps,
        num_stages=1, **pdl_launch_kwargs(a.device, enabled=PDL_4BIT))


def mxfp4_moe_gemm_torch(out: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                         local_ids: torch.Tensor, *, top_k_in: int, bias: Optional[torch.Tensor]) -> None:
    """The CPU path: out[p] = a[p // top_k_in] @ W[e_p].T (+ bias) for pairs with e_p >= 0, other rows 0.

    Each routed expert's weight is dequantised on the fly (one [N, K] float32 temporary at a time).
    """
    flat = local_ids.reshape(-1)
    out.zero_()
    for e in torch.unique(flat).tolist():
        if e < 0:
            continue
        pairs = torch.nonzero(flat == e).squeeze(1)
        w = dequantize_mxfp4(blocks[e], scales[e], torch.float32)
        res = a.index_select(0, pairs // top_k_in).float() @ w.t()
        if bias is not None:
            res = res + bias[e].float()
        out.index_copy_(0, pairs, res.to(out.dtype))
