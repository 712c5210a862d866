"""A MoE LoRA seam split in two: the shrink as its own launch, the expand in the base GEMM's epilogue.

On the sorted path the fused MoE LoRA kernel adds its delta into the GEMM's output by a read-modify-write after
the GEMM (at 4096 tokens on Qwen3-30B-A3B's widths, ~470 MB a layer of output read and written again, on the
critical path).  Here the seam launches only the shrink (``moe_lora_shrink`` over the (adapter, expert)
alignment: fp32 [S, pairs, R]) and hands the base grouped GEMM a ``MoELoRAEpilogue``, whose expand the GEMM adds
to its fp32 tile before its one rounding (``_moe_lora_epilogue_kernel.lora_expand_epilogue``).  The output is
written once; the GEMM's router weight and bias apply to base + delta alike, which is the in-place path's math
with one rounding fewer.

``epilogue_kernel_args`` turns an epilogue into the named arguments of a GEMM kernel that takes one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vllm.lora.ops.triton_ops import moe_lora_checks as chk
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.triton_utils import triton_interpreting


#: the split seams' shrink in this many K ranges (``moe_lora_shrink(split_k=)``: short chains, many programs),
#: their partials summed by the epilogue; 1: one program per block walks all of K (untimed which is faster)
SHRINK_SPLIT_K = 1


@dataclass(frozen=True, eq=False)
class MoELoRAEpilogue:
    """The expand half of one MoE LoRA seam, for a base GEMM's epilogue.

    shrunk: fp32 [S, pairs, R], row p the shrink of pair p (read only for pairs on an enabled slot); or [P, S,
        pairs, R], P partials of a shrink split along K (``moe_lora_shrink(split_k=)``), summed in order.
    lora_b: S tensors [L, E, N_s, R] (one N_s), views of one buffer at a constant stride when S > 1.
    col0: the GEMM output column where slice 0 starts; slice s starts at col0 + s * slice_cols.
    token_lora_mapping: [>= pairs / top_k] int32 slot of each token, -1 = none.
    adapter_enabled: [L + 1] int32, entry s != 0 when slot s holds an adapter.
    top_k: pairs per token (pair p belongs to token p // top_k).
    expert0: the local expert of the GEMM's expert 0 (a GEMM over a chunk of the experts, as the 4-bit experts'
        dequant path runs them, numbers them from 0).
    """

    shrunk: torch.Tensor
    lora_b: tuple[torch.Tensor, ...]
    col0: int
    slice_cols: int
    token_lora_mapping: torch.Tensor
    adapter_enabled: torch.Tensor
    top_k: int
    expert0: int = 0

    def for_experts(self, e0: int) -> "MoELoRAEpilogue":
        """The epilogue of a GEMM over the experts from ``e0`` on, numbered from 0."""
        return dataclasses.replace(self, expert0=e0)

    @staticmethod
    def fits(lora_b: tuple[torch.Tensor, ...]) -> bool:
        """Whether the slices can go in one epilogue: one width, one base pointer at a constant stride."""
        return len({b.shape[2] for b in lora_b}) == 1 and chk.uniform_slice_stride(list(lora_b)) is not None

    def check(self, num_pairs: int, out_cols: int, dtype: torch.dtype, device: torch.device) -> None:
        """What a GEMM of ``num_pairs`` rows x ``out_cols`` columns in ``dtype`` needs of this epilogue."""
        S = len(self.lora_b)
        L, E, n_s, R = self.lora_b[0].shape
        if not self.fits(self.lora_b):
            raise ValueError("lora_b slices must share a width and one buffer at a constant stride")
        if self.shrunk.dtype != torch.float32 or tuple(self.shrunk.shape[-3:]) != (S, num_pairs, R) \
                or self.shrunk.dim() not in (3, 4):
            raise ValueError(f"shrunk must be fp32 [{S}, {num_pairs}, {R}] or [parts, {S}, {num_pairs}, {R}], got "
                             f"{self.shrunk.dtype} {tuple(self.shrunk.shape)}")
        if self.lora_b[0].dtype != dtype:
            raise ValueError(f"lora_b dtype {self.lora_b[0].dtype} differs from the GEMM's {dtype}")
        if self.col0 < 0 or self.col0 + (S - 1) * self.slice_cols + n_s > out_cols:
            raise ValueError(f"{S} slices of {n_s} columns from column {self.col0} (every {self.slice_cols}) "
                             f"overrun the GEMM's {out_cols} output columns")
        if not 0 <= self.expert0 < E:
            raise ValueError(f"expert0={self.expert0} is not one of the {E} local experts")
        if self.adapter_enabled.numel() != L + 1:
            raise ValueError(f"adapter_enabled has {self.adapter_enabled.numel()} entries for {L} slots")
        if self.token_lora_mapping.numel() * self.top_k < num_pairs:
            raise ValueError(f"token_lora_mapping has {self.token_lora_mapping.numel()} entries for "
                             f"{num_pairs // self.top_k} tokens")
        for t in (self.shrunk, self.lora_b[0], self.token_lora_mapping, self.adapter_enabled):
            if t.device != device:
                raise ValueError(f"the LoRA epilogue's tensors must be on {device}, got {t.device}")


def epilogue_kernel_args(epi: MoELoRAEpilogue) -> dict[str, Any]:
    """The ``lora_*`` / ``LORA_*`` named arguments of a GEMM kernel that takes ``lora_expand_epilogue``."""
    b0 = epi.lora_b[0]
    L, _, n_s, R = b0.shape
    interp = triton_interpreting()
    sh = epi.shrunk if epi.shrunk.dim() == 4 else epi.shrunk.unsqueeze(0)  # [parts, S, pairs, R]
    return dict(
        lora_s_ptr=epi.shrunk, lora_b_ptr=b0, lora_map_ptr=epi.token_lora_mapping,
        lora_enabled_ptr=epi.adapter_enabled, lora_top_k=epi.top_k, lora_max_loras=L, lora_R=R,
        lora_n_slice=n_s, lora_col0=epi.col0, lora_slice_cols=epi.slice_cols, lora_expert0=epi.expert0,
        stride_lsk=sh.stride(0), stride_lss=sh.stride(1), stride_lsp=sh.stride(2), stride_lsr=sh.stride(3),
        stride_lbs=chk.uniform_slice_stride(list(epi.lora_b)) or 0, stride_lbl=b0.stride(0),
        stride_lbe=b0.stride(1), stride_lbn=b0.stride(2), stride_lbr=b0.stride(3),
        LORA_SLICES=len(epi.lora_b), LORA_BLOCK_R=rank_block(R), LORA_PARTS=sh.shape[0],
        LORA_EXPAND_MODE=1 if b0.dtype == torch.bfloat16 else 0,
        LORA_UPCAST=interp, LORA_FP32_PRECISION="ieee" if interp else "tf32x3",
    )
