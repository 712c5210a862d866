"""A LoRA expand in the grouped GEMM's epilogue: GEMM2 with the w2 LoRA (``lora_mixin.GEMM2_LORA_EPILOGUE``, off until
timed on a GPU).

The w2 LoRA on sorted routing today is a separate launch after GEMM2 that reads each pair's output row back,
adds ``shrunk @ B[slot, expert]^T`` (times the router weight) and writes it again: at 256 Qwen3-30B-A3B tokens an
8 MB read-modify-write per layer on top of w2's 46 MB of adapter bytes (docs/performance.md, thirty-first
session).  With ``GemmLoRAEpilogue`` the GEMM adds the delta to its fp32 accumulator before its one rounding:

    out[p] = ((a[p] @ w[e_p]^T + bias[e_p]) + shrunk[p] @ B[slot(p), e_p]^T) * weight_p

``shrunk`` is the fp32 [pairs, R] LoRA shrink made before the GEMM (the MoE LoRA kernels' shrink-only mode);
``token_slots`` [tokens] int32 maps each token (pair // top_k) to its adapter slot (-1: none).  A program of
one expert's M-block expands once per slot its rows use (at most ``L`` small dots of K = R), in the MoE LoRA
kernels' bf16x3 split, so the delta is fp32-exact up to the accumulation order.  Rows without a slot get no
delta: the output is bit for bit the GEMM without the epilogue.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm.triton_utils import next_power_of_2, triton_interpreting


@dataclasses.dataclass(frozen=True)
class GemmLoRAEpilogue:
    """shrunk [pairs, R] fp32; lora_b [L, E, N, R] (the GEMM's dtype); token_slots [pairs // top_k] int32."""

    shrunk: torch.Tensor
    lora_b: torch.Tensor
    token_slots: torch.Tensor
    top_k: int

    def kernel_args(self, out: torch.Tensor, num_pairs: int, E: int, N: int) -> dict[str, Any]:
        """The GEMM kernel's LoRA arguments, after checking them against its output and weight shapes."""
        s, b, m = self.shrunk, self.lora_b, self.token_slots
        if s.dtype != torch.float32 or s.dim() != 2 or s.shape[0] != num_pairs:
            raise ValueError(f"lora epilogue: shrunk must be fp32 [{num_pairs}, R], got {s.dtype} {tuple(s.shape)}")
        R = s.shape[1]
        if b.dim() != 4 or tuple(b.shape[1:]) != (E, N, R):
            raise ValueError(f"lora epilogue: lora_b must be [L, {E}, {N}, {R}], got {tuple(b.shape)}")
        if self.top_k < 1 or num_pairs % self.top_k:
            raise ValueError(f"lora epilogue: top_k={self.top_k} does not divide the {num_pairs} pairs")
        if m.dtype != torch.int32 or m.dim() != 1 or m.numel() != num_pairs // self.top_k:
            raise ValueError(f"lora epilogue: token_slots must be int32 [{num_pairs // self.top_k}], "
                             f"got {m.dtype} {tuple(m.shape)}")
        if len({t.device for t in (s, b, m, out)}) != 1:
            raise ValueError("lora epilogue: shrunk, lora_b, token_slots and out must be on one device")
        bf16_b = b.dtype == torch.bfloat16
        return dict(LORA_EPI=True, shrunk_ptr=s, lora_b_ptr=b, slots_ptr=m, lora_top_k=self.top_k,
                    num_slots=b.shape[0], R=R, stride_sp=s.stride(0), stride_sr=s.stride(1),
                    stride_lbl=b.stride(0), stride_lbe=b.stride(1), stride_lbn=b.stride(2), stride_lbr=b.stride(3),
                    BLOCK_R=max(16, next_power_of_2(R)), EXPAND_MODE=1 if bf16_b else 0,
                    FP32_PRECISION="ieee" if triton_interpreting() else "tf32x3")


def gemm_lora_epilogue_reference(shrunk: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                                 topk_ids: torch.Tensor) -> torch.Tensor:
    """float64 [pairs, N]: each pair's ``shrunk @ B[slot, expert]^T`` (zero without a slot or an expert)."""
    ids = topk_ids.reshape(-1).long()
    top_k = topk_ids.shape[-1] if topk_ids.dim() > 1 else 1
    slots = token_slots.long().repeat_interleave(top_k)
    out = torch.zeros(ids.numel(), lora_b.shape[2], dtype=torch.float64, device=shrunk.device)
    for p in range(ids.numel()):
        if slots[p] >= 0 and ids[p] >= 0:
            out[p] = shrunk[p].double() @ lora_b[slots[p], ids[p]].double().T
    return out
