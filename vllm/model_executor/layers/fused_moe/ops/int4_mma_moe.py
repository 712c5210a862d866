"""The int4 (W4A16) grouped GEMM on tensor cores for few rows per expert: ``csrc/capi/int4_mma_moe.cu``.

Same contract as ``invoke_int4_moe_gemm`` (sorted alignment or one block per pair, split-K partials
added by the same reduction launch, which can apply the activation or the top-k sum), over the
weights repacked by ``int4_mma_layout.repack_for_mma``.  The kernel: mma.sync m16n8k16 with the
weight as operand A (16 output channels) and up to 8 or 16 of an expert's rows as operand B; the
int4 codes become bf16 / fp16 ``bias + q`` by one LOP3 per two weights, minus ``bias + zero``
exactly, and each scale group's fp32 sum is scaled once (the fp32 reference's arithmetic up to the
summation order, one rounding at the store).  CUDA only, through ``vllm.platforms.cuda_lib``;
act-order (``perm`` / ``g_idx``) weights are not taken (``mma_unsupported_reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight
from vllm.model_executor.layers.fused_moe.ops.int4_mma_layout import repack_for_mma, unpack_mma
from vllm.model_executor.layers.fused_moe.ops.moe_launch import (
    check_16_byte_rows,
    epilogue_plan,
    reduce_splits,
    routed_blocks,
    router_weights_f32,
    split_target,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import pairs_per_touched_expert
from vllm.platforms import cuda_lib
from vllm.platforms.pdl import PDL_4BIT, pdl_launch_kwargs

logger = init_logger(__name__)

BLOCK_N = 128  # output channels per CTA (8 warps x 16): the kernel's kRows (``block_n()``: the built one's)
STAGE_KS = (256, 128)  # the kernel's stage widths, widest first
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}
_NUM_SMS = 132  # H100 SXM and H200
MIN_CTAS_PER_SM = 2  # split K until the launch has this many CTAs per SM (2 fit at the 256-wide stage) ...
MIN_SPLIT_K = 2048  # ... while each split keeps at least this many inputs (H200: shorter splits lost, 15th session)
BLOCK_MS = (8, 16, 32, 64)  # rows per block the kernel takes (32 and 64: 128-wide stages)
# sorted launches: the smallest block of at least 1.5x the expected pairs per touched expert (room for the
# spread; 64-row blocks, several per expert, from 43 pairs), up to this many expected pairs; beyond, the dequant
# path.  H200, the layer at 64-row blocks vs dequantise + bf16 GEMM (us, twentieth session): int4 Mixtral 256
# pairs per expert 2872 vs 3265, 1024: 11497 vs 6670; Qwen3 256: 1554 vs 1495; MXFP4 gpt-oss-20b 128: 1005 vs
# 1746, 512: 3679 vs 2738; gpt-oss-120b 128: 4082 vs 7200.  With the dequantiser's "words" order (twenty-first
# session; kernel vs dequant, us): int4 Mixtral 128 pairs 1677 vs 2332, 256: 2998 vs 2815; Qwen3 128: 851 vs 1087,
# 256: 1550 vs 1304; MXFP4 20b 128: 994 vs 1307; 120b 128: 3913 vs 5625.  Linear between the points, the paths
# cross at ~190 (Qwen3), ~230 (Mixtral), ~180 (20b) and ~230 (120b) pairs per expert, hence 192
MMA_MAX_ROWS = 192.0
_SLOTS = {256: 2 * _NUM_SMS, 128: 3 * _NUM_SMS}  # resident CTAs (shared memory / registers) per stage width


@dataclass
class Int4MmaWeight:
    """``packed``'s weight in the tensor-core layout: ``words`` [E, N/16, K/64, 32, 4] int32, and its
    scales / zeros / group (shared with ``packed``, not copied)."""

    words: torch.Tensor
    packed: Int4PackedWeight

    @classmethod
    def from_packed(cls, packed: Int4PackedWeight) -> "Int4MmaWeight":
        return cls(repack_for_mma(packed.qweight), packed)

    def dequantize(self, out: torch.Tensor, e0: int, e1: int, *, use_triton: Optional[bool] = None) -> torch.Tensor:
        """Experts [e0, e1) densely into ``out`` [e1 - e0, N, K] (its dtype): bit for bit
        ``Int4PackedWeight.dequantize_expert`` (exact q - z, the scale in the dtype, one rounding); the dequant
        path's weights when only these words are kept.  ``use_triton``: None = one Triton launch on CUDA
        (``w4_mma_dequant``), the torch unpacking elsewhere."""
        p, dtype = self.packed, out.dtype
        if out.is_cuda if use_triton is None else use_triton:
            from vllm.model_executor.layers.fused_moe.ops.w4_mma_dequant import dequantize_mma_words

            return dequantize_mma_words(self.words, p.scales, out, e0, e1, mxfp4=False, zeros=p.zeros,
                                        group_size=p.group_size)
        q = unpack_mma(self.words[e0:e1])  # [E', N, K] uint8
        G = p.scales.shape[1]
        s = p.scales[e0:e1].to(dtype).transpose(1, 2).repeat_interleave(p.group_size, dim=2)[:, :, :p.k]
        if p.zeros is not None:
            z = p.zeros[e0:e1].transpose(1, 2).repeat_interleave(p.group_size, dim=2)[:, :, :p.k].to(dtype)
        else:
            z = 8
        assert G * p.group_size >= p.k
        out.copy_((q.to(dtype) - z) * s)
        return out


@dataclass
class MmaPlan:
    """One MoE forward on the tensor-core kernel: rows per block (the alignment's block size), the two
    repacked weights, and each GEMM's split-K."""

    block_m: int
    w13: Int4MmaWeight
    w2: Int4MmaWeight
    splits: Tuple[int, int]
    stages: Tuple[int, int]


def mma_block_m(num_pairs: int, num_experts: int, unsorted: bool) -> Optional[int]:
    """Rows per block (``BLOCK_MS``) for a launch of ``num_pairs`` over ``num_experts`` (8: one pair per block
    when unsorted), or None when experts expect more rows than ``MMA_MAX_ROWS``."""
    if unsorted:
        return 8
    rows = pairs_per_touched_expert(num_pairs, num_experts)
    if rows > MMA_MAX_ROWS * (1 + 1e-6):  # slack: an expectation of exactly the limit must not round past it
        return None
    return next((bm for bm in BLOCK_MS if bm >= 1.5 * rows), BLOCK_MS[-1])


def expected_blocks(pairs: int, num_experts: int, block_m: int, unsorted: bool) -> int:
    """Blocks a launch of ``pairs`` is expected to have (its CTAs per N tile): one per pair unsorted, else one per
    touched expert, several each beyond ``block_m`` expected rows (the split and stage choices count them)."""
    if unsorted:
        return pairs
    return min(pairs, num_experts) * max(1, math.ceil(pairs_per_touched_expert(pairs, num_experts) / block_m))


def block_m_or_dequant(pairs: int, num_experts: int, unsorted: bool,
                       dequant_takes: Callable[[], bool]) -> Optional[int]:
    """Rows per block for a tensor-core launch of ``pairs`` (``mma_block_m``), or None where the dequant path takes
    it instead: beyond ``MMA_MAX_ROWS`` expected rows per expert, or when forced (``dequant_path.FORCE_PATH``), unless
    ``dequant_takes()`` (the caller's ``take_dequant_path`` for its weight kind) refuses, as inside a graph capture:
    then the widest blocks, several per expert, since the repacked words are the only copy."""
    from vllm.model_executor.layers.fused_moe.experts import dequant_path

    bm = mma_block_m(pairs, num_experts, unsorted)
    if bm is None or dequant_path.FORCE_PATH == "dequant":  # tests and benchmarks may force the path
        if dequant_takes():
            return None
        bm = bm or BLOCK_MS[-1]
    return bm


def mma_weights_for(w13: Int4PackedWeight, w2: Int4PackedWeight,
                    dtype: torch.dtype) -> Optional[Tuple[Int4MmaWeight, Int4MmaWeight]]:
    """Both projections repacked for the kernel, or None (the reason logged) where it cannot run them."""
    if cuda_lib.library() is None:
        return None
    for name, w in (("w13", w13), ("w2", w2)):
        reason = mma_unsupported_reason(w, dtype)
        if reason:
            logger.info("int4 experts stay on the Triton kernels: the tensor-core kernel cannot take %s (%s)",
                        name, reason)
            return None
    logger.info("int4 experts: decode launches on the tensor-core kernel (csrc/capi/int4_mma_moe.cu)")
    return Int4MmaWeight.from_packed(w13), Int4MmaWeight.from_packed(w2)


def _stage_fits(bk: int, K: int, group: int) -> bool:
    return K % bk == 0 and group % 32 == 0 and (bk % group == 0 or group % bk == 0)


def shape_only(t: torch.Tensor) -> torch.Tensor:
    """A view with ``t``'s shape and dtype over one element: what stands in for the Triton layout's words once
    only the tensor-core copy is kept (``Int4PackedWeight``'s n / k / num_experts read its shape)."""
    return torch.zeros(1, dtype=t.dtype, device=t.device).expand(*t.shape)


def stage_k(K: int, group: int, block_m: int = 8, ctas: int = 0) -> Optional[int]:
    """The stage width (inputs per pipeline step): one that tiles K and fits the group (divides it or is a
    multiple of it), or None.  256 where K >= 2048 and the launch fills the resident slots no worse than
    128's (H200, fifteenth session: 128 won at K = 768 and where its third CTA per SM saved a wave);
    blocks of 32+ rows: 128 (shared memory)."""
    if not _stage_fits(128, K, group):
        return None
    wide = (block_m <= 16 and K >= 2048 and _stage_fits(256, K, group)
            and -(-ctas // _SLOTS[256]) <= -(-ctas // _SLOTS[128]))
    return 256 if wide else 128


def mma_unsupported_reason(w: Int4PackedWeight, dtype: torch.dtype) -> Optional[str]:
    """Why the tensor-core kernel cannot run ``w`` with ``dtype`` activations, or None when it can."""
    if dtype not in _DTYPE_CODE:
        return f"activations are {dtype}, the kernel takes bf16 / fp16"
    if w.scales.dtype != dtype:
        return f"scales are {w.scales.dtype}, the activations {dtype}"
    if w.perm is not None or w.g_idx is not None:
        return "act-order weights (perm / g_idx)"
    if w.n % 16:
        return f"N={w.n} is not a multiple of 16"
    if stage_k(w.k, w.group_size) is None:
        return f"K={w.k} with group {w.group_size}: needs K % 128 == 0 and a group of 32, 64, or a multiple of 128"
    if w.scales.stride(2) != 1 or (w.zeros is not None and w.zeros.stride(2) != 1):
        return "scales / zeros rows are not contiguous"
    return None


def block_n() -> int:
    """Output channels per CTA of the built kernel (its ``kRows``: 128, or 64 in a ``-DW4_WARPS=4`` build), else
    ``BLOCK_N``."""
    lib = cuda_lib.library()
    return int(lib.vllm_int4_mma_block_n()) if lib is not None else BLOCK_N


def ctas_of(num_blocks: int, N: int) -> int:
    return num_blocks * -(-N // block_n())


def default_split(num_blocks: int, N: int, K: int, bk: int) -> int:
    """Split K (powers of two) until there are MIN_CTAS_PER_SM CTAs per SM, keeping >= MIN_SPLIT_K inputs
    (and whole stages) per split."""
    ctas, split = ctas_of(num_blocks, N), 1
    while ctas * split < MIN_CTAS_PER_SM * _NUM_SMS and K // (split * 2) >= MIN_SPLIT_K \
            and (K // bk) % (split * 2) == 0:
        split *= 2
    return split


def launch_shape(num_blocks: int, N: int, K: int, group: int, block_m: int) -> Tuple[int, int]:
    """(stage width, split-K) the defaults give one launch."""
    bk = stage_k(K, group, block_m, ctas_of(num_blocks, N))
    return bk, default_split(num_blocks, N, K, bk)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def invoke_int4_mma_moe_gemm(a: torch.Tensor, w: Int4MmaWeight, out: torch.Tensor, *, top_k_in: int, block_m: int,
                             sorted_token_ids: Optional[torch.Tensor] = None,
                             block_expert_ids: Optional[torch.Tensor] = None,
                             num_tokens_post_padded: Optional[torch.Tensor] = None,
                             pair_expert_ids: Optional[torch.Tensor] = None,
                             topk_weights: Optional[torch.Tensor] = None, mul_routed_weight: bool = False,
                             split_k: Optional[int] = None, stage: Optional[int] = None,
                             split_buffer: Optional[torch.Tensor] = None, may_drop_pairs: bool = True,
                             epilogue_activation: Optional[MoEActivation] = None, epilogue_top_k: int = 0) -> None:
    """Write every routed pair's row of ``out`` [num_rows * top_k_in, N] (or, with an epilogue, the
    activation / top-k sum of them): ``invoke_int4_moe_gemm``'s contract, with ``block_m`` (8 or 16) the
    alignment's block size (unsorted: ``pair_expert_ids``, one block per pair).  ``split_k`` / ``stage``:
    None = the defaults (``default_split``, ``stage_k``)."""
    lib = cuda_lib.library()
    if lib is None:
        raise RuntimeError("the CUDA C++ int4 kernel is not available here (see the log); use invoke_int4_moe_gemm")
    p = w.packed
    reason = mma_unsupported_reason(p, a.dtype)
    if reason:
        raise ValueError(f"the tensor-core int4 kernel cannot run this weight: {reason}")
    E, N, K = p.num_experts, p.n, p.k
    if a.dim() != 2 or a.shape[1] != K or a.stride(1) != 1 or a.stride(0) % 8:
        raise ValueError(f"a must be [rows, {K}] with unit column stride and 16-byte aligned rows")
    num_pairs = a.shape[0] * top_k_in
    if block_m not in BLOCK_MS:
        raise ValueError(f"block_m={block_m}: the kernel takes blocks of {BLOCK_MS} rows")
    sorted_mode = pair_expert_ids is None
    num_blocks = routed_blocks(num_pairs, E, block_m, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
                               pair_expert_ids, "block_m")
    expert_ids = block_expert_ids if sorted_mode else pair_expert_ids
    est_blocks = min(num_blocks, E) if sorted_mode else num_blocks
    bk = stage or stage_k(K, p.group_size, block_m, ctas_of(est_blocks, N))
    if bk not in STAGE_KS or not _stage_fits(bk, K, p.group_size) or (block_m > 16 and bk != 128):
        raise ValueError(f"stage={bk} does not tile K={K} with group {p.group_size} (blocks of 32+ rows: 128)")
    split = split_k or default_split(est_blocks, N, K, bk)
    split = max(1, min(split, K // bk))
    act_code, rows, out_shape = epilogue_plan(num_pairs, N, epilogue_activation, epilogue_top_k,
                                              split > 1 and epilogue_activation is not MoEActivation.SWIGLUOAI)
    if tuple(out.shape) != out_shape or out.dtype != a.dtype:
        raise ValueError(f"out must be {a.dtype} {list(out_shape)}, got {tuple(out.shape)} {out.dtype}")
    check_16_byte_rows(a=a, scales=p.scales, zeros=p.zeros, words=w.words)
    tw = router_weights_f32(topk_weights, mul_routed_weight, num_pairs)
    if num_pairs == 0 or N == 0 or num_blocks == 0:
        return
    target, t_os, t_om, fp32 = split_target(out, split, num_pairs, N, split_buffer, may_drop_pairs)
    pdl = pdl_launch_kwargs(a.device, enabled=PDL_4BIT)  # the int4 launchers' switch (vllm/platforms/pdl.py)
    err = lib.vllm_int4_mma_moe_gemm(
        _DTYPE_CODE[a.dtype], a.data_ptr(), a.stride(0), w.words.data_ptr(), w.words.stride(0),
        p.scales.data_ptr(), p.scales.stride(0), p.scales.stride(1),
        _ptr(p.zeros), p.zeros.stride(0) if p.zeros is not None else 0, p.zeros.stride(1) if p.zeros is not None else 0,
        target.data_ptr(), t_os, t_om, fp32, _ptr(tw),
        _ptr(sorted_token_ids) if sorted_mode else None, expert_ids.data_ptr(),
        _ptr(num_tokens_post_padded) if sorted_mode else None,
        num_blocks, block_m, num_pairs, top_k_in, N, K, p.group_size, bk, split, int(pdl["USE_PDL"]),
        torch.cuda.current_stream(a.device).cuda_stream)
    cuda_lib.check(lib, err, "int4_mma_moe_gemm")
    if split > 1:
        reduce_splits(target, out, split, rows, act_code, pdl)
