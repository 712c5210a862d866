"""The MXFP4 grouped GEMM on tensor cores for few rows per expert: ``csrc/capi/mxfp4_mma_moe.cu``.

The int4 tensor-core kernel's design (``int4_mma_moe.py``, ``csrc/capi/w4_mma_moe.cuh``) on MXFP4 weights:
the words repacked once by ``mxfp4_mma_layout.repack_mxfp4_for_mma``, the e8m0 scales transposed to
[E, K/32, N].  Each e2m1 code becomes its bf16 value * 2^-126 by a rotation and a mask (or two), one HMUL2
restores it exactly, and each 32-input group's fp32 sum is scaled by 2^(s - 127) once: the fp32 reference's
arithmetic up to the summation order, + bias, x router weight, rounded once.  Same contract as
``invoke_mxfp4_moe_gemm``: ``out[p] = (a[p // top_k_in] @ W[e_p].T + bias[e_p]) * weight_p``.  bf16 activations,
CUDA only, through ``vllm.platforms.cuda_lib``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import BLOCK_MS, _NUM_SMS, _ptr, ctas_of
from vllm.model_executor.layers.fused_moe.ops.moe_launch import (
    check_16_byte_rows,
    epilogue_plan,
    reduce_splits,
    routed_blocks,
    router_weights_f32,
    split_target,
)
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import E2M1_VALUES, MXFP4_BLOCK
from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_layout import repack_mxfp4_for_mma, unpack_mxfp4_mma
from vllm.platforms import cuda_lib
from vllm.platforms.pdl import PDL_4BIT, pdl_launch_kwargs

logger = init_logger(__name__)

STAGE_KS = (256, 128, 64)  # the kernel's stage widths for MXFP4, widest first (32+ rows: 64 / 128)
MIN_SPLIT_K = 1024  # split K while each split keeps at least this many inputs (and the launch is under 2 CTAs/SM)


@dataclass
class Mxfp4MmaWeight:
    """One projection's MXFP4 weight in the tensor-core layout: ``words`` [E, N/16, K/64, 32, 4] int32, the
    e8m0 ``scales_t`` [E, K/32, N] uint8, and ``fold``: every exponent is <= 128, so the kernel multiplies each
    decoded weight by its scale in bf16 (exact) instead of scaling each group's fp32 sum."""

    words: torch.Tensor
    scales_t: torch.Tensor
    fold: bool = False

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor) -> "Mxfp4MmaWeight":
        """From the checkpoint's blocks [E, N, K/32, 16] and scales [E, N, K/32] (uint8); reads the scales' maximum
        (a host sync, at load)."""
        return cls(repack_mxfp4_for_mma(blocks), scales.transpose(1, 2).contiguous(), can_fold(scales))

    @property
    def num_experts(self) -> int:
        return self.words.shape[0]

    @property
    def n(self) -> int:
        return self.words.shape[1] * 16

    @property
    def k(self) -> int:
        return self.words.shape[2] * 64

    def dequantize(self, out: torch.Tensor, e0: int, e1: int, *, use_triton: Optional[bool] = None) -> torch.Tensor:
        """Experts [e0, e1) densely into ``out`` [e1 - e0, N, K] (its dtype): exact in fp32, rounded once, as
        ``dequantize_mxfp4``; the dequant path's weights when only these words are kept.  ``use_triton``: None =
        one Triton launch on CUDA (``w4_mma_dequant``), the torch unpacking elsewhere."""
        if out.is_cuda if use_triton is None else use_triton:
            from vllm.model_executor.layers.fused_moe.ops.w4_mma_dequant import dequantize_mma_words

            return dequantize_mma_words(self.words, self.scales_t, out, e0, e1, mxfp4=True)
        codes = unpack_mxfp4_mma(self.words[e0:e1]).long()  # [E', N, K]
        table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=out.device)
        exp = self.scales_t[e0:e1].transpose(1, 2).to(torch.int32).sub(127).float()  # [E', N, K/32]
        values = torch.ldexp(table[codes].view(*codes.shape[:2], -1, MXFP4_BLOCK), exp.unsqueeze(-1))
        out.copy_(values.flatten(-2))
        return out


def can_fold(scales: torch.Tensor) -> bool:
    """Whether every e8m0 exponent is <= 128: then 2^(s - 1) (the decode's 2^126 times the scale) is a normal
    bf16, and v * 2^(s - 127) is exact in bf16 for every e2m1 value v (real checkpoints: scales <= 2)."""
    return scales.numel() == 0 or int(scales.max()) <= 128


def mxfp4_mma_unsupported_reason(N: int, K: int, dtype: torch.dtype) -> Optional[str]:
    """Why the tensor-core kernel cannot run an [N, K] MXFP4 projection with ``dtype`` activations, or None."""
    if dtype != torch.bfloat16:
        return f"activations are {dtype}; the kernel's decode writes bf16"
    if N % 16:
        return f"N={N} is not a multiple of 16"
    if K % 64:
        return f"K={K} is not a multiple of 64"
    return None


def mxfp4_mma_weights_for(w13: Tuple[torch.Tensor, torch.Tensor], w2: Tuple[torch.Tensor, torch.Tensor],
                          dtype: torch.dtype) -> Optional[Tuple[Mxfp4MmaWeight, Mxfp4MmaWeight]]:
    """Both projections ((blocks, scales) each) repacked for the kernel, or None (the reason logged)."""
    if cuda_lib.library() is None:
        return None
    for name, (blocks, _) in (("w13", w13), ("w2", w2)):
        reason = mxfp4_mma_unsupported_reason(blocks.shape[1], blocks.shape[2] * MXFP4_BLOCK, dtype)
        if reason:
            logger.info("MXFP4 experts stay on the Triton kernels: the tensor-core kernel cannot take %s (%s)",
                        name, reason)
            return None
    logger.info("MXFP4 experts: decode launches on the tensor-core kernel (csrc/capi/mxfp4_mma_moe.cu)")
    return Mxfp4MmaWeight.from_blocks(*w13), Mxfp4MmaWeight.from_blocks(*w2)


def mx_stage_k(K: int, block_m: int, ctas: int) -> int:
    """The stage width: 256 for narrow blocks where K >= 2048 and the launch is at most one wave of two CTAs per
    SM, else 128 (64 below 128 inputs).  K need not be a multiple: the last stage is partial (gpt-oss's
    K = 2880 is 11 stages of 256 and one of 64), which the kernel zero-fills."""
    if block_m <= 16 and K >= 2048 and ctas <= 2 * _NUM_SMS:
        return 256
    return 128 if K >= 128 else 64


def mx_default_split(num_blocks: int, N: int, K: int, bk: int) -> int:
    """Split K (powers of two) until the launch has two CTAs per SM, keeping >= MIN_SPLIT_K inputs per split."""
    ctas, split = ctas_of(num_blocks, N), 1
    while ctas * split < 2 * _NUM_SMS and K // (split * 2) >= MIN_SPLIT_K and -(-K // bk) >= split * 2:
        split *= 2
    return split


def mx_launch_shape(num_blocks: int, N: int, K: int, block_m: int) -> Tuple[int, int]:
    """(stage width, split-K) the defaults give one launch."""
    bk = mx_stage_k(K, block_m, ctas_of(num_blocks, N))
    return bk, mx_default_split(num_blocks, N, K, bk)


def invoke_mxfp4_mma_moe_gemm(a: torch.Tensor, w: Mxfp4MmaWeight, out: torch.Tensor, *, top_k_in: int,
                              block_m: int, sorted_token_ids: Optional[torch.Tensor] = None,
                              block_expert_ids: Optional[torch.Tensor] = None,
                              num_tokens_post_padded: Optional[torch.Tensor] = None,
                              pair_expert_ids: Optional[torch.Tensor] = None,
                              topk_weights: Optional[torch.Tensor] = None, mul_routed_weight: bool = False,
                              bias: Optional[torch.Tensor] = None, split_k: Optional[int] = None,
                              stage: Optional[int] = None, split_buffer: Optional[torch.Tensor] = None,
                              may_drop_pairs: bool = True, epilogue_activation: Optional[MoEActivation] = None,
                              epilogue_top_k: int = 0) -> None:
    """Write every routed pair's row of ``out`` [num_rows * top_k_in, N]: (a @ W.T + bias) x router weight.
    Routing: the alignment for blocks of ``block_m`` rows, or ``pair_expert_ids`` (one block per pair, block_m
    8).  bias: [E, N] in a's dtype, or None.  ``split_k`` / ``stage``: None = the defaults.  With split-K the
    reduction may instead write the activation of the rows (``epilogue_activation``, out [pairs, N/2] for gated
    ones; swigluoai bit for bit the unfused one) or the top-k sum (``epilogue_top_k``: out [pairs / k, N])."""
    lib = cuda_lib.library()
    if lib is None:
        raise RuntimeError("the CUDA C++ MXFP4 kernel is not available here (see the log); use invoke_mxfp4_moe_gemm")
    E, N, K = w.num_experts, w.n, w.k
    reason = mxfp4_mma_unsupported_reason(N, K, a.dtype)
    if reason:
        raise ValueError(f"the tensor-core MXFP4 kernel cannot run this weight: {reason}")
    if a.dim() != 2 or a.shape[1] != K or a.stride(1) != 1:
        raise ValueError(f"a must be [rows, {K}] with unit column stride")
    if tuple(w.scales_t.shape) != (E, K // MXFP4_BLOCK, N) or w.scales_t.dtype != torch.uint8 \
            or w.scales_t.stride(2) != 1:
        raise ValueError(f"scales_t must be uint8 [{E}, {K // MXFP4_BLOCK}, {N}] with contiguous rows")
    if bias is not None and (tuple(bias.shape) != (E, N) or bias.dtype != a.dtype or bias.stride(1) != 1):
        raise ValueError(f"bias must be {a.dtype} [{E}, {N}] with unit column stride, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if block_m not in BLOCK_MS:
        raise ValueError(f"block_m={block_m}: the kernel takes blocks of {BLOCK_MS} rows")
    num_pairs = a.shape[0] * top_k_in
    sorted_mode = pair_expert_ids is None
    num_blocks = routed_blocks(num_pairs, E, block_m, sorted_token_ids, block_expert_ids, num_tokens_post_padded,
                               pair_expert_ids, "block_m")
    est_blocks = min(num_blocks, E) if sorted_mode else num_blocks
    bk = stage or mx_stage_k(K, block_m, ctas_of(est_blocks, N))
    if bk not in STAGE_KS or (block_m > 16 and bk == 256):
        raise ValueError(f"stage={bk}: the kernel takes stages of {STAGE_KS} inputs (blocks of 32+ rows: 64 / 128)")
    split = max(1, min(split_k or mx_default_split(est_blocks, N, K, bk), -(-K // bk)))
    act_code, rows, out_shape = epilogue_plan(num_pairs, N, epilogue_activation, epilogue_top_k, split > 1)
    if tuple(out.shape) != out_shape or out.dtype != a.dtype:
        raise ValueError(f"out must be {a.dtype} {list(out_shape)}, got {tuple(out.shape)} {out.dtype}")
    check_16_byte_rows(a=a, scales_t=w.scales_t, words=w.words)
    tw = router_weights_f32(topk_weights, mul_routed_weight, num_pairs)
    if num_pairs == 0 or N == 0 or num_blocks == 0:
        return
    target, t_os, t_om, fp32 = split_target(out, split, num_pairs, N, split_buffer, may_drop_pairs)
    pdl = pdl_launch_kwargs(a.device, enabled=PDL_4BIT)
    expert_ids = block_expert_ids if sorted_mode else pair_expert_ids
    err = lib.vllm_mxfp4_mma_moe_gemm(
        a.data_ptr(), a.stride(0), w.words.data_ptr(), w.words.stride(0),
        w.scales_t.data_ptr(), w.scales_t.stride(0), w.scales_t.stride(1),
        _ptr(bias), bias.stride(0) if bias is not None else 0,
        target.data_ptr(), t_os, t_om, fp32, _ptr(tw),
        _ptr(sorted_token_ids) if sorted_mode else None, expert_ids.data_ptr(),
        _ptr(num_tokens_post_padded) if sorted_mode else None,
        num_blocks, block_m, num_pairs, top_k_in, N, K, bk, split, int(w.fold), int(pdl["USE_PDL"]),
        torch.cuda.current_stream(a.device).cuda_stream)
    cuda_lib.check(lib, err, "mxfp4_mma_moe_gemm")
    if split > 1:
        reduce_splits(target, out, split, rows, act_code, pdl)
