"""The MoE LoRA delta added in the base grouped GEMM's epilogue, on the base expert alignment.

The unfused seams (``fused_moe_lora``) sort the pairs a second time, by (adapter slot, expert), and add the
delta to the GEMM output in place: a second alignment (three launches) and a read-modify-write of the
output.  Here, per GEMM:

1. ``moe_lora_epilogue(x, lora_a, lora_b, alignment=..., ...)`` runs one shrink launch over the blocks of
   the base alignment (``moe_lora_block_shrink_kernel``: a block's pairs share an expert, not a slot; each
   K tile of x meets the A tile of every slot present) into fp32 ``shrunk`` [S, pairs, R], and returns a
   ``MoELoRAEpilogue``;
2. the grouped GEMM (``invoke_fused_moe_gemm(..., lora=epilogue)``) adds ``shrunk @ B^T`` of each row's
   slot to its fp32 accumulator before the bias and the router weight, and rounds once.

Per flat pair p of a token with an enabled slot (others get nothing), as ``fused_moe_lora``::

    out[p, n] = (base[p, n] + sum_r shrunk[s(n), p, r] * B_s(n)[slot, e, n - col(s(n)), r] + bias) * w_p

Column n belongs to slice ``n // slice_cols`` (gate, up: ``slice_cols`` = I; one fused slice: all N).
``LORA_IN_GEMM_EPILOGUE`` switches the path (see ``PunicaWrapperGPU.moe_lora_in_epilogue``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.triton_utils import next_power_of_2, triton_interpreting

# Whether the Triton experts add the MoE LoRA delta in their GEMM epilogues on the sorted path, or (the
# default) as the fused shrink+expand launches after each GEMM.  Off: on an H200 (benchmark_moe_lora.py
# --lora-epilogue 1 vs 0, whole layer with LoRA, rank 16, 4 adapters) it lost at every size measured - Qwen3-30B-A3B
# 256 / 1024 / 4096 tokens 422.5 / 616.4 / 1151.9 us vs 418.3 / 543.1 / 1076.1, Mixtral-8x7B 256 tokens 1108.6 vs
# 932.3, gpt-oss-20b 64 tokens 487.7 vs 447.6: the shrink on mixed-slot blocks (63 us for Qwen3's two at 256
# tokens, as much as the seams' whole shrink+expand, 59 us) and the epilogue's per-slot dots (+22-26 us on the
# GEMMs at 256 tokens, +170 at 4096) cost more than the (adapter, expert) alignment and the output
# read-modify-write they remove (~25 us and ~7 us at 256 tokens).  Those runs had one dot per slot in the
# shrink's K loop and in the epilogue; the slots side by side (``CONCAT``: one dot, the K loop one x and one A
# load; sm_90 static compile 80-165 registers, a cp.async-pipelined K loop, `moe_lora_static_report.py
# --epilogue`) came after the GPU time and is untimed: `bash scripts/gpu_check.sh epilogue` decides the default.
LORA_IN_GEMM_EPILOGUE = False
# The shrink and the epilogue put every slot's rank tile side by side (one dot) while slots x rank tile is at
# most this many columns; above it they loop over the slots present in the block.
_CONCAT_MAX_COLS = 128


def concat_slots(max_loras: int, rank: int) -> bool:
    """Whether the shrink and the epilogue take every slot's A / B tile side by side (``CONCAT``)."""
    return slot_tile(max_loras) * rank_block(rank) <= _CONCAT_MAX_COLS


def slot_tile(max_loras: int) -> int:
    """SLOTS: the slot count padded to a power of two (a tile dimension; the extra slots are never read)."""
    return next_power_of_2(max(max_loras, 1))


@dataclass(frozen=True)
class MoELoRAEpilogue:
    """What the grouped GEMM's epilogue reads to add one GEMM's LoRA delta (see the module docstring).

    shrunk: fp32 [S, pairs, R]; lora_b: the first slice's B [L, E, slice_cols, R] (slice s at
    ``s * slice_stride`` elements from it); token_lora_mapping: [>= M] int32 slot per token, -1 = none;
    adapter_enabled: [L + 1] int32; top_k: pairs per token.
    """

    shrunk: torch.Tensor
    lora_b: torch.Tensor
    slice_stride: int
    num_slices: int
    slice_cols: int
    token_lora_mapping: torch.Tensor
    adapter_enabled: torch.Tensor
    top_k: int

    def check(self, num_pairs: int, N: int) -> None:
        """Refuse an epilogue made for other pairs or another output width."""
        if self.shrunk.shape[1] != num_pairs:
            raise ValueError(f"the LoRA epilogue was made for {self.shrunk.shape[1]} pairs, the GEMM has {num_pairs}")
        if self.num_slices * self.slice_cols != N:
            raise ValueError(f"the LoRA epilogue covers {self.num_slices} x {self.slice_cols} columns, the GEMM "
                             f"writes {N}")

    def kernel_args(self) -> dict[str, Any]:
        """The grouped GEMM kernel's ``lora_*`` arguments and constexprs."""
        b, s = self.lora_b, self.shrunk
        return dict(
            lora_s_ptr=s, lora_b_ptr=b, lora_map_ptr=self.token_lora_mapping,
            lora_enabled_ptr=self.adapter_enabled, lora_top_k=self.top_k, lora_rank=b.shape[3],
            lora_max_loras=b.shape[0], lora_slice_cols=self.slice_cols,
            lora_stride_ss=s.stride(0), lora_stride_sp=s.stride(1), lora_stride_sr=s.stride(2),
            lora_stride_bs=self.slice_stride, lora_stride_bl=b.stride(0), lora_stride_be=b.stride(1),
            lora_stride_bn=b.stride(2), lora_stride_br=b.stride(3),
            LORA=True, LORA_SLOTS=slot_tile(b.shape[0]), LORA_SLICES=self.num_slices,
            LORA_BLOCK_R=rank_block(b.shape[3]),
            LORA_EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0, LORA_CONCAT=concat_slots(b.shape[0], b.shape[3]),
            LORA_FP32_PRECISION="ieee" if triton_interpreting() else "tf32x3",
        )


def no_lora_kernel_args(dummy: Optional[torch.Tensor]) -> dict[str, Any]:
    """The grouped GEMM kernel's ``lora_*`` arguments when it adds no LoRA delta (pointers: ``dummy``)."""
    return dict(lora_s_ptr=dummy, lora_b_ptr=dummy, lora_map_ptr=dummy, lora_enabled_ptr=dummy, lora_top_k=1,
                lora_rank=0, lora_max_loras=0, lora_slice_cols=1, lora_stride_ss=0, lora_stride_sp=0,
                lora_stride_sr=0, lora_stride_bs=0, lora_stride_bl=0, lora_stride_be=0, lora_stride_bn=0,
                lora_stride_br=0, LORA=False, LORA_SLOTS=1, LORA_SLICES=1, LORA_BLOCK_R=16, LORA_EXPAND_MODE=0,
                LORA_CONCAT=True, LORA_FP32_PRECISION="ieee")


def shrink_tiles(block_m: int, K: int, block_k: Optional[int]) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the shrink: few, wide K steps (a block's program walks all of K with every
    slot's A tile); K tiles of 128 from 128-row blocks (shared memory).  On an H200 K tiles of 64 and of 256
    gave the same layer time (Qwen3-30B-A3B at 256 tokens with LoRA: 422.5 vs 421.0 us)."""
    if block_k is None:
        block_k = 256 if block_m <= 64 else 128
    block_k = min(block_k, max(16, 1 << (K - 1).bit_length()))
    return block_k, 8 if block_k >= 256 else 4


def _slice_stride(ts: Sequence[torch.Tensor], name: str) -> int:
    from vllm.lora.ops.triton_ops.fused_moe_lora import _uniform_slice_stride

    stride = _uniform_slice_stride(list(ts))
    if stride is None:
        raise ValueError(f"{name}: the slices must be views of one buffer at a constant stride (the stacked "
                         f"[S, L, E, ...] layout) for the GEMM epilogue")
    return stride


def moe_lora_epilogue(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], *,
                      sorted_token_ids: torch.Tensor, block_expert_ids: torch.Tensor,
                      num_tokens_post_padded: torch.Tensor, block_size: int, token_lora_mapping: torch.Tensor,
                      adapter_enabled: torch.Tensor, top_k: int, top_k_in: int,
                      block_size_k: Optional[int] = None) -> MoELoRAEpilogue:
    """Shrink every routed pair on the base expert alignment and return the GEMM epilogue of its delta.

    x: [pairs // top_k_in, K] (hidden states with top_k_in = top_k, or the activation output with 1);
    lora_a: S tensors [L, E, R, K]; lora_b: S tensors [L, E, N_s, R] (x's dtype); the alignment:
    ``moe_align_block_size(local expert ids, block_size, E)``'s, the one the GEMM walks.
    block_size_k: the shrink's K tile (default: ``shrink_tiles``).
    """
    from vllm.lora.ops.triton_ops._moe_lora_epilogue_kernels import moe_lora_block_shrink_kernel

    a0, b0 = lora_a[0], lora_b[0]
    L, E, R, K = a0.shape
    if len(lora_a) != len(lora_b) or any(a.shape != a0.shape for a in lora_a) or any(
            b.shape != b0.shape for b in lora_b):
        raise ValueError(f"lora_a / lora_b slices must share shapes: {[tuple(a.shape) for a in lora_a]}, "
                         f"{[tuple(b.shape) for b in lora_b]}")
    if tuple(b0.shape[:2]) != (L, E) or b0.shape[3] != R:
        raise ValueError(f"lora_b {tuple(b0.shape)} must be [{L}, {E}, N, {R}] for lora_a {tuple(a0.shape)}")
    if x.dim() != 2 or x.shape[1] != K or x.dtype != a0.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} must be [rows, {K}] {a0.dtype}")
    if adapter_enabled.shape != (L + 1,):
        raise ValueError(f"adapter_enabled must be [max_loras + 1] = [{L + 1}], got {tuple(adapter_enabled.shape)}")
    num_pairs = x.shape[0] * top_k_in
    if token_lora_mapping.dim() != 1 or token_lora_mapping.shape[0] * top_k < num_pairs:
        raise ValueError(f"token_lora_mapping {tuple(token_lora_mapping.shape)} has too few entries for "
                         f"{num_pairs} pairs of top_k={top_k}")
    S = len(lora_a)
    stride_as, stride_bs = _slice_stride(lora_a, "lora_a"), _slice_stride(lora_b, "lora_b")
    shrunk = torch.empty((S, num_pairs, R), dtype=torch.float32, device=x.device)
    if num_pairs:
        interp = triton_interpreting()
        block_k, warps = shrink_tiles(block_size, K, block_size_k)
        # used blocks: a prefix of at most ceil(pairs / block) + min(pairs, E) (see invoke_fused_moe_gemm)
        blocks = min(block_expert_ids.numel(), -(-num_pairs // block_size) + min(num_pairs, E))
        moe_lora_block_shrink_kernel[(blocks, S)](
            x_ptr=x, a_ptr=a0, s_ptr=shrunk, sorted_ids_ptr=sorted_token_ids, block_expert_ids_ptr=block_expert_ids,
            num_post_padded_ptr=num_tokens_post_padded, map_ptr=token_lora_mapping, enabled_ptr=adapter_enabled,
            numel=num_pairs, top_k=top_k, top_k_in=top_k_in, K=K, R=R, max_loras=L,
            stride_xm=x.stride(0), stride_xk=x.stride(1), stride_as=stride_as, stride_al=a0.stride(0),
            stride_ae=a0.stride(1), stride_ar=a0.stride(2), stride_ak=a0.stride(3),
            stride_ss=shrunk.stride(0), stride_sp=shrunk.stride(1), stride_sr=shrunk.stride(2),
            SLOTS=slot_tile(L), CONCAT=concat_slots(L, R), EVEN_K=K % block_k == 0, UPCAST=interp,
            FP32_PRECISION="ieee" if interp else "tf32x3",
            BLOCK_M=block_size, BLOCK_K=block_k, BLOCK_R=rank_block(R), num_warps=warps, num_stages=2)
    return MoELoRAEpilogue(shrunk=shrunk, lora_b=b0, slice_stride=stride_bs, num_slices=S, slice_cols=b0.shape[2],
                           token_lora_mapping=token_lora_mapping, adapter_enabled=adapter_enabled, top_k=top_k)
