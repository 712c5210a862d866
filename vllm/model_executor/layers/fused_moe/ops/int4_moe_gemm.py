"""Int4 (W4A16) grouped expert GEMM: launcher, tile config, torch reference.

The same op as ``fused_moe_gemm.py`` with the weight packed 4-bit (``Int4PackedWeight``):

    out[p] = (a[p // top_k_in][perm_e] @ dequant(w[e]).T) * (topk_weights.flatten()[p] if mul_routed_weight)

e the expert of pair p; accumulated in fp32, stored in ``out.dtype``.  Routing comes from
``moe_align_block_size(topk_ids, config.block_size_m, E_local)``, shared by both GEMMs, or,
for a few pairs among many experts (``use_unsorted_int4_gemm``), from the pairs' expert ids
directly: one program per pair, no sort (three launches fewer at decode).

Small batches (decode) touch few experts, so few tiles: the K loop is then split over
``SPLIT_K`` programs writing fp32 partial sums that one reduction kernel adds and casts
(``get_int4_moe_config`` picks it so that the grid covers the GPU about twice).  Graph-safe: no
host reads of device values.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.kernel_configs.tile_config import Int4TileConfig, tuned_tiles
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight, int4_moe_gemm_reference  # noqa: F401
from vllm.model_executor.layers.fused_moe.ops.moe_launch import epilogue_plan, routed_blocks, split_target
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import pairs_per_touched_expert
from vllm.model_executor.layers.fused_moe.ops.int4_dot_smem import unpack3_stages_that_fit
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import PDL_4BIT, pdl_launch_kwargs

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUM_SMS = 132  # H100 SXM and H200
UNPACK_DECODE_TILES = True  # unsplit decode tiles: UNPACK 3 where it fits shared memory, 4 / 5 from 32 rows
# the mode UNPACK_DECODE_TILES gives tiles of BLOCK_SIZE_M >= SWAP_MIN_BLOCK_M: 5 or 4 (the operands swapped)
# or 3.  H200 (benchmark_moe_int4.py --sweep --sweep-variants-only, eleventh session), us per GEMM w13 / w2 at
# 32x128x128: Qwen3-30B-A3B 256 tokens 5: 279.7 / 155.6, 4: 363.5 / 191.7, 3: 457.7 / 235.4; Mixtral-8x7B 64
# tokens 4: 820.0 / 412.1, 3: 1034.4 / 529.9.  On 16-row tiles 4 loses and 5 ties 3 (Qwen3 64 tokens: 259.0 /
# 135.5, 190.9 / 102.8, 192.7 / 103.7): they keep 3
DECODE_UNPACK, SWAP_MIN_BLOCK_M = 5, 32
# unsplit 64- / 128-row tiles where the swap applies (not with DECODE_UNPACK 3): BLOCK_SIZE_M -> (BLOCK_SIZE_N,
# BLOCK_SIZE_K, num_warps, UNPACK, num_stages).  H200, us per GEMM w13 / w2 vs the old UNPACK 0 tiles
# (docs/performance.md, twelfth session): Mixtral-8x7B 256 tokens 1619.3 / 1036.5 vs 3029.1 / 2687.8; Mixtral
# 1024 tokens 4753.9 / 2902.2 vs 11451.9 / 6551.6 (UNPACK 5: 5362.0 / 3254.0).  Outside CUDA graphs the dequant
# path mostly takes these tiers
WIDE_SWAP_TILES = {64: (256, 128, 8, 5, 3), 128: (256, 128, 8, 4, 1)}
GEMV_UNSORTED = True  # the unsorted small-batch launch runs the FMA GEMV (see _gemv_config)
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS, GEMV_PROGRAMS_PER_SM = 128, 256, 4, 4
GEMV_MAX_BLOCK_M = 16  # rows of one sorted block the GEMV accumulates (_int4_gemv_rows_kernel.py)
# sorted launches with <= this many pairs per touched expert run the multi-row GEMV (sorted_gemv_applies):
# BLOCK_SIZE_M 1-2, where the static report shows fewer instructions per weight than the dot kernel (4 rows: more)
GEMV_SORTED_MAX_ROWS = 3.0


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def get_int4_moe_config(num_pairs: int, num_experts: int, N: int, K: int, group_size: int,
                        dtype: torch.dtype, *, sorted_pairs: bool = True,
                        gemv: Optional[bool] = None) -> Int4TileConfig:
    """Tile config of one int4 GEMM (tiles, GROUP_SIZE_M, SPLIT_K, warps, stages, UNPACK, GEMV).

    ``sorted_pairs=False``: the unsorted small-batch launch (one program per pair), which the heuristic
    gives to the FMA GEMV (``GEMV_UNSORTED``); sorted launches with few pairs per expert
    (``sorted_gemv_applies``) get the multi-row GEMV, whose BLOCK_SIZE_M (1-16) is also the alignment's
    block size; ``gemv`` True / False forces the GEMV's / the dot kernel's tiles (the static report and
    the sweep compare them).  A tuned file
    (``vllm/kernel_configs``: op ``int4_moe_gemm``, keys E, N, K, G = group size, ``sorted``; its
    table keyed by the routed pair count M * top_k) overrides the heuristic's fields; an entry with an
    unknown key or a value ``check_int4_tile_config`` rejects is an error naming the file."""
    if gemv is None:
        gemv = sorted_gemv_applies(num_pairs, num_experts) if sorted_pairs else GEMV_UNSORTED
    if not gemv:
        cfg = _heuristic_config(num_pairs, num_experts, N, K, group_size, dtype, sorted_pairs)
    elif sorted_pairs:
        cfg = _gemv_rows_config(num_pairs, num_experts, N, K)
    else:
        cfg = _gemv_config(num_pairs, N, K)
    if triton_interpreting():
        return cfg
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import _device_name

    key = {"E": num_experts, "N": N, "K": K, "G": group_size, "sorted": int(sorted_pairs)}
    return tuned_tiles(cfg, "int4_moe_gemm", key, num_pairs, _device_name(), check=check_int4_tile_config)


def _heuristic_config(num_pairs: int, num_experts: int, N: int, K: int, group_size: int, dtype: torch.dtype,
                      sorted_pairs: bool) -> Int4TileConfig:
    per_expert = num_pairs / max(num_experts, 1) if sorted_pairs else 1
    if triton_interpreting():  # ~5 ms per loop iteration per program: few, big tiles
        return Int4TileConfig(block_size_m=16 if per_expert <= 16 else 32, block_size_n=_pow2_at_least(N, 16, 128),
                              block_size_k=_pow2_at_least(K, 16, 128), num_warps=4, num_stages=1)
    # (block_size_m, block_size_n, block_size_k, group_size_m, num_warps, num_stages)
    if per_expert <= 8:
        bm, bn, bk, gm, warps, stages = 16, 128, 128, 1, 4, 4
    elif per_expert <= 32:
        bm, bn, bk, gm, warps, stages = 32, 128, 128, 8, 4, 4
    elif per_expert <= 96:
        bm, bn, bk, gm, warps, stages = 64, 128, 64, 8, 4, 4
    else:
        bm, bn, bk, gm, warps, stages = 128, 128, 64, 8, 8, 3
    if dtype == torch.float32:
        bk //= 2
    bn = min(bn, _pow2_at_least(N, 16, 256))
    bk = min(bk, _pow2_at_least(K, 16, 256))
    # Split K when the tiles cannot fill the GPU twice over (decode touches few experts).
    m_tiles = -(-num_pairs // bm) + min(num_pairs, num_experts) if sorted_pairs else num_pairs
    tiles = m_tiles * -(-N // bn)
    k_tiles = -(-K // bk)
    split = 1
    while tiles * split < 2 * _NUM_SMS and split * 2 <= min(8, k_tiles // 2):
        split *= 2
    # how the kernel unpacks the codes (see _int4_moe_gemm_kernel.py).  The static report
    # (benchmarks/kernels/kernel_static_report.py) shows ~30 % fewer main-loop instructions per weight on
    # sm_90 for UNPACK 3 on unsplit decode tiles (4-32 rows per expert: 16x128x128 and 32x128x128), but on an
    # H200 one of its configurations ran out of shared memory (262144 > 232448 B, fp16, 1 token), so
    # UNPACK_DECODE_TILES gives 3 with the most stages (<= the heuristic's) whose shared memory fits
    # (int4_dot_smem.py).  H200 A/B (benchmark_moe_int4.py --sweep-variants-only): 1.16-1.46x over UNPACK 0
    # at Qwen3-30B-A3B 64 tokens and Mixtral-8x7B 16 / 64 tokens.
    unpack = 0
    swap = UNPACK_DECODE_TILES and DECODE_UNPACK in (4, 5) and split == 1 and dtype != torch.float32
    wide = WIDE_SWAP_TILES.get(bm) if swap else None
    if wide is not None and N >= wide[0] and K >= wide[1] and group_size > 0 and group_size % wide[1] == 0:
        bn, bk, warps, unpack, stages = wide
    elif UNPACK_DECODE_TILES and split == 1 and bk >= 128 and group_size > 0 and group_size % bk == 0:
        if DECODE_UNPACK in (4, 5) and bm >= SWAP_MIN_BLOCK_M:  # 4 is not pipelined (one stage), 5 is
            unpack, stages = DECODE_UNPACK, 1 if DECODE_UNPACK == 4 else 3
        elif (fit := unpack3_stages_that_fit(bm, bn, bk, stages)) is not None:
            unpack, stages = 3, fit
    return Int4TileConfig(block_size_m=bm, block_size_n=bn, block_size_k=bk, group_size_m=gm, split_k=split,
                          num_warps=warps, num_stages=stages, unpack=unpack)


def _gemv_config(num_pairs: int, N: int, K: int) -> Int4TileConfig:
    """The FMA GEMV's tiles (``_int4_gemv_kernel.py``): [BLOCK_SIZE_K / 8, BLOCK_SIZE_N] words per K-step,
    and K split until the grid has GEMV_PROGRAMS_PER_SM programs per SM (each holds one K-step of words
    in flight: the loads of several programs hide the memory latency)."""
    if triton_interpreting():
        return Int4TileConfig(block_size_m=16, block_size_n=_pow2_at_least(N, 16, 128),
                              block_size_k=_pow2_at_least(K, 16, 128), num_warps=4, num_stages=1, gemv=1)
    bn = min(GEMV_BLOCK_N, _pow2_at_least(N, 16, 256))
    bk = min(GEMV_BLOCK_K, _pow2_at_least(K, 16, 256))
    tiles = num_pairs * -(-N // bn)
    k_tiles = -(-K // bk)
    split = 1
    while tiles * split < GEMV_PROGRAMS_PER_SM * _NUM_SMS and split * 2 <= min(16, k_tiles):
        split *= 2
    return Int4TileConfig(block_size_m=16, block_size_n=bn, block_size_k=bk, split_k=split,
                          num_warps=GEMV_WARPS, num_stages=1, gemv=1)


def sorted_gemv_applies(num_pairs: int, num_experts: int) -> bool:
    """Whether the heuristic gives a sorted launch to the multi-row GEMV: at most ``GEMV_SORTED_MAX_ROWS``
    expected pairs per expert that gets any (Qwen3-30B-A3B at 16 tokens: 1.6; Mixtral-8x7B: 4.1).  Both
    GEMMs of a layer share the alignment, so this depends on the routing only (never on N, K or the
    dtype): both get the GEMV and the same BLOCK_SIZE_M, or neither.  Off under the interpreter, whose
    configs keep the tl.dot kernel's paths covered by the CPU tests (the GEMV's own tests force it)."""
    return not triton_interpreting() and pairs_per_touched_expert(num_pairs, num_experts) <= GEMV_SORTED_MAX_ROWS


def _gemv_rows_config(num_pairs: int, num_experts: int, N: int, K: int) -> Int4TileConfig:
    """The multi-row GEMV's tiles (``_int4_gemv_rows_kernel.py``): BLOCK_SIZE_M = the expected pairs per
    expert that gets any, to the nearest power of two (1-16: a block of BLOCK_SIZE_M rows reads its
    expert's weight once; rows beyond the real ones cost FMAs), and BLOCK_SIZE_K shrinking as
    BLOCK_SIZE_M grows (BLOCK_SIZE_M * BLOCK_SIZE_K <= GEMV_BLOCK_K), so that the [BLOCK_SIZE_M,
    BLOCK_SIZE_K / 8, BLOCK_SIZE_N] fp32 accumulators fit the registers; K split as ``_gemv_config``."""
    per_expert = pairs_per_touched_expert(num_pairs, num_experts)
    bm = 1
    while bm * 1.5 < per_expert and bm < GEMV_MAX_BLOCK_M:  # nearest power of two (geometric midpoint ~1.41)
        bm *= 2
    if triton_interpreting():
        return Int4TileConfig(block_size_m=bm, block_size_n=_pow2_at_least(N, 16, 128),
                              block_size_k=_pow2_at_least(K, 16, 128), num_warps=4, num_stages=1, gemv=1)
    bn = min(GEMV_BLOCK_N, _pow2_at_least(N, 16, 256))
    bk = min(max(16, GEMV_BLOCK_K // bm), _pow2_at_least(K, 16, 256))
    blocks = max(num_pairs / per_expert, num_pairs / bm)  # about this many blocks hold pairs
    tiles = blocks * -(-N // bn)
    k_tiles = -(-K // bk)
    split = 1
    while tiles * split < GEMV_PROGRAMS_PER_SM * _NUM_SMS and split * 2 <= min(16, k_tiles):
        split *= 2
    return Int4TileConfig(block_size_m=bm, block_size_n=bn, block_size_k=bk, split_k=split,
                          num_warps=GEMV_WARPS, num_stages=1, gemv=1)


def check_int4_tile_config(config: Int4TileConfig) -> None:
    """What ``invoke_int4_moe_gemm`` needs of a config: power-of-two tiles >= 16, whole int32 words per
    K-tile, an UNPACK mode 0-5 (``TypeError`` for anything but an ``Int4TileConfig``)."""
    if not isinstance(config, Int4TileConfig):
        raise TypeError(f"config must be an Int4TileConfig (get_int4_moe_config, or Int4TileConfig.from_json for "
                        f"a dict of BLOCK_SIZE_M, ...), got {type(config).__name__}")
    if config.gemv not in (0, 1):
        raise ValueError(f"GEMV={config.gemv}: 1 (the FMA GEMV: one row per program unsorted, BLOCK_SIZE_M rows "
                         "sorted) or 0 (tl.dot)")
    for name in ("block_size_m", "block_size_n", "block_size_k"):
        v = getattr(config, name)
        if config.gemv and name == "block_size_m":
            if v > GEMV_MAX_BLOCK_M or v & (v - 1):
                raise ValueError(f"BLOCK_SIZE_M={v}: the GEMV's rows per sorted block must be a power of two "
                                 f"<= {GEMV_MAX_BLOCK_M} (1, 2, 4, ...)")
        elif v < 16 or v & (v - 1):
            raise ValueError(f"{name.upper()}={v}: tl.dot tiles must be powers of two >= 16"
                             + (" (smaller BLOCK_SIZE_M needs GEMV=1)" if name == "block_size_m" else ""))
    if config.unpack not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"UNPACK={config.unpack}: 0 (reshape), 1 (duplicated word loads), 2 (1 + bit-placement "
                         "decode), 3 (split by code position, scales after the dot; _int4_moe_gemm_kernel.py), 4 or 5 "
                         "(operands swapped, _int4_moe_gemm_swap_kernel.py)")


def unpack3_applies(w: Int4PackedWeight, block_k: int) -> bool:
    """Whether ``UNPACK`` 3 (or 4, 5) can run: one scale group per K-tile (the group size a multiple of
    BLOCK_SIZE_K, no per-channel g_idx) and 8 dots of at least 16 (BLOCK_SIZE_K >= 128).  The
    launcher runs ``UNPACK`` 0 where it cannot, so that one config serves every weight of a shape."""
    return w.g_idx is None and w.group_size % block_k == 0 and block_k >= 128


def can_fuse_epilogue(config: Int4TileConfig, activation: Optional[MoEActivation] = None) -> bool:
    """Whether ``invoke_int4_moe_gemm`` can apply the activation (or a top-k sum) in its split-K reduction."""
    return config.split_k > 1 and activation is not MoEActivation.SWIGLUOAI


def use_unsorted_int4_gemm(num_pairs: int, num_experts: int) -> bool:
    """Small batches skip ``moe_align_block_size`` (three launches): one program per (token, k) pair.

    Pairs that share an expert then read its weight once each, so only when they are few compared
    with the experts (rarely two on one expert): num_pairs * 4 <= E_local, at most 64 pairs.
    """
    return num_pairs * 4 <= num_experts and num_pairs <= 64


def invoke_int4_moe_gemm(a: torch.Tensor, w: Int4PackedWeight, out: torch.Tensor, *, top_k_in: int,
                         config: Int4TileConfig,
                         sorted_token_ids: Optional[torch.Tensor] = None,
                         block_expert_ids: Optional[torch.Tensor] = None,
                         num_tokens_post_padded: Optional[torch.Tensor] = None,
                         pair_expert_ids: Optional[torch.Tensor] = None,
                         topk_weights: Optional[torch.Tensor] = None, mul_routed_weight: bool = False,
                         split_buffer: Optional[torch.Tensor] = None, may_drop_pairs: bool = True,
                         epilogue_activation: Optional[MoEActivation] = None, epilogue_top_k: int = 0) -> None:
    """Write every routed pair's row of ``out`` [num_rows * top_k_in, N]; see the module docstring.

    Routing, one of: the three outputs of ``moe_align_block_size(ids, config.block_size_m, E)``
    (sorted), or ``pair_expert_ids`` (unsorted: [num_pairs] int32 local expert of each pair, -1 =
    skip; one program per pair, see ``use_unsorted_int4_gemm``).
    With ``config.split_k > 1`` every row of ``out`` is written (pairs in no block get zeros),
    using ``split_buffer`` (fp32, at least SPLIT_K * num_pairs * N elements; allocated if None);
    otherwise pairs in no block are left untouched.  ``may_drop_pairs=False`` promises that every
    pair has an expert (no -1 ids: no expert map), which saves zeroing the split buffer.

    Split-K only (``SPLIT_K > 1``, see ``can_fuse_epilogue``): the reduction that adds the splits can
    also apply the next step, saving its launch.  ``epilogue_activation``: ``out`` is the activation
    output [num_pairs, N/2 gated or N]; ``epilogue_top_k`` = k: ``out`` is the top-k sum [num_pairs / k, N].
    """
    check_int4_tile_config(config)
    bm, bn, bk = config.block_size_m, config.block_size_n, config.block_size_k
    split, unpack = config.split_k, config.unpack
    if unpack >= 3 and not unpack3_applies(w, bk):
        unpack = 0  # documented: 3-5 need one scale group per K-tile and BLOCK_SIZE_K >= 128
    if a.dim() != 2 or a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"a must be a 2-D fp16/bf16/fp32 tensor, got {a.dim()}-D {a.dtype}")
    E, N, K = w.num_experts, w.n, w.k
    if a.shape[1] != K:
        raise ValueError(f"a has K={a.shape[1]} but the int4 weight has K={K}")
    if bk % 8:
        raise ValueError(f"BLOCK_SIZE_K={bk} must be a multiple of 8 (whole int32 words)")
    if w.qweight.dtype != torch.int32 or w.qweight.stride(2) != 1 or w.scales.stride(2) != 1:
        raise ValueError("the int4 weight must be packed by Int4MoEMethod (int32 words, contiguous rows)")
    if w.zeros is not None and (w.zeros.dtype != torch.uint8 or w.zeros.stride(2) != 1):
        raise ValueError("int4 zeros must be uint8 [E, G, N], contiguous rows")
    num_pairs = a.shape[0] * top_k_in
    act_code, rows, out_shape = epilogue_plan(num_pairs, N, epilogue_activation, epilogue_top_k,
                                              can_fuse_epilogue(config, epilogue_activation))
    if tuple(out.shape) != out_shape or out.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out must be float {list(out_shape)}, got {tuple(out.shape)} {out.dtype}")
    sorted_mode = pair_expert_ids is None
    num_pid_m = routed_blocks(num_pairs, E, bm, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
                              pair_expert_ids, "BLOCK_SIZE_M")
    if mul_routed_weight and (topk_weights is None or topk_weights.numel() != num_pairs):
        raise ValueError(f"mul_routed_weight=True needs topk_weights with {num_pairs} values")
    if num_pairs == 0 or N == 0 or num_pid_m == 0:
        return

    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import (
        _int4_moe_gemm_kernel,
        _split_k_reduce_kernel,
    )

    if split > 1:  # fp32 partials (zeroed where pairs may be in no block: every split stores all its block rows)
        target, t_split, t_row, _ = split_target(out, split, num_pairs, N, split_buffer, may_drop_pairs)
        t_strides = (t_split, t_row, 1)
    else:
        target = out
        t_strides = (0, out.stride(0), out.stride(1))
    dummy = w.qweight
    grid = (num_pid_m * -(-N // bn), split)
    pdl = pdl_launch_kwargs(a.device, enabled=PDL_4BIT)
    if config.gemv and sorted_mode:
        from vllm.model_executor.layers.fused_moe.ops._int4_gemv_rows_kernel import _int4_gemv_rows_kernel

        _int4_gemv_rows_kernel[grid](
            a, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
            w.g_idx if w.g_idx is not None else dummy, w.perm if w.perm is not None else dummy,
            target, topk_weights.reshape(-1) if mul_routed_weight else dummy,
            sorted_token_ids, block_expert_ids, num_tokens_post_padded,
            0x4B000000, N, K, num_pairs, top_k_in, a.stride(0), a.stride(1), w.qweight.stride(0), w.qweight.stride(1),
            w.scales.stride(0), w.scales.stride(1),
            w.zeros.stride(0) if w.zeros is not None else 0, w.zeros.stride(1) if w.zeros is not None else 0,
            K, *t_strides,
            GROUP_SIZE=w.group_size, HAS_ZEROS=w.zeros is not None, HAS_G_IDX=w.g_idx is not None,
            HAS_PERM=w.perm is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, EVEN_K=K % bk == 0, EVEN_N=N % bn == 0,
            SPLIT_K=split, BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
            num_warps=config.num_warps, num_stages=1, **pdl)
    elif config.gemv:
        from vllm.model_executor.layers.fused_moe.ops._int4_gemv_kernel import _int4_gemv_kernel

        _int4_gemv_kernel[grid](
            a, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
            w.g_idx if w.g_idx is not None else dummy, w.perm if w.perm is not None else dummy,
            target, topk_weights.reshape(-1) if mul_routed_weight else dummy, pair_expert_ids,
            0x4B000000, N, K, top_k_in, a.stride(0), a.stride(1), w.qweight.stride(0), w.qweight.stride(1),
            w.scales.stride(0), w.scales.stride(1),
            w.zeros.stride(0) if w.zeros is not None else 0, w.zeros.stride(1) if w.zeros is not None else 0,
            K, *t_strides,
            GROUP_SIZE=w.group_size, HAS_ZEROS=w.zeros is not None, HAS_G_IDX=w.g_idx is not None,
            HAS_PERM=w.perm is not None, MUL_ROUTED_WEIGHT=mul_routed_weight, EVEN_K=K % bk == 0, EVEN_N=N % bn == 0,
            SPLIT_K=split, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
            num_warps=config.num_warps, num_stages=1, **pdl)
    else:
        kernel, words = _int4_moe_gemm_kernel, w.qweight
        if unpack >= 4:  # the operands swapped; 4 reads the words as int16 halves
            from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_swap_kernel import (
                _int4_moe_gemm_swap_kernel as kernel)
            words = w.qweight.view(torch.int16) if unpack == 4 else w.qweight
        kernel[grid](
            a, words, w.scales, w.zeros if w.zeros is not None else dummy,
            w.g_idx if w.g_idx is not None else dummy, w.perm if w.perm is not None else dummy,
            target, topk_weights.reshape(-1) if mul_routed_weight else dummy,
            sorted_token_ids if sorted_mode else dummy, block_expert_ids if sorted_mode else pair_expert_ids,
            num_tokens_post_padded if sorted_mode else dummy,
            N, K, num_pid_m, num_pairs, top_k_in,
            a.stride(0), a.stride(1),
            words.stride(0), words.stride(1),  # [E, K/8, N]: expert, word row
            w.scales.stride(0), w.scales.stride(1),
            w.zeros.stride(0) if w.zeros is not None else 0, w.zeros.stride(1) if w.zeros is not None else 0,
            K,
            *t_strides,
            GROUP_SIZE=w.group_size,
            HAS_ZEROS=w.zeros is not None,
            HAS_G_IDX=w.g_idx is not None,
            HAS_PERM=w.perm is not None,
            MUL_ROUTED_WEIGHT=mul_routed_weight,
            UPCAST_DOT=triton_interpreting() and a.dtype != torch.float32,
            EVEN_K=K % bk == 0,
            SPLIT_K=split,
            BLOCK_SIZE_M=bm,
            BLOCK_SIZE_N=bn,
            BLOCK_SIZE_K=bk,
            GROUP_SIZE_M=config.group_size_m if sorted_mode else 1,
            SORTED=sorted_mode,
            UNPACK=unpack,
            num_warps=config.num_warps,
            num_stages=config.num_stages, **pdl,
        )
    if split > 1:  # one launch: add the splits, apply the epilogue, cast, store into out (any strides)
        block = 1024
        _split_k_reduce_kernel[(-(-out.numel() // block),)](
            target, out, out.shape[0], out.shape[1], target.stride(0), target.stride(1), out.stride(0),
            out.stride(1), SPLIT_K=split, ROWS=rows, ACT=act_code, BLOCK=block, **pdl)

