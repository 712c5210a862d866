"""The fused MoE LoRA op on the experts' own alignment, without an (adapter, expert) alignment (prototype).

``fused_moe_lora_expert_blocks`` adds the LoRA delta of every pair like ``fused_moe_lora`` on its sorted
path, but reads the base GEMMs' ``AlignResult`` (pairs grouped by local expert) where that op reads a
``MoELoRAAlignment``: each M-block's program loops over the adapter slots among its rows (kernel and
reasons: ``_moe_lora_expert_block_kernel.py``).  Not wired into the layers yet: what it would save is the
LoRA alignment's three launches at decode batches that take the sorted path (Qwen3-30B-A3B at 256 tokens).
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.lora.ops.triton_ops import moe_lora_checks as chk
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import AlignResult
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import triton_interpreting

#: the sorted path's MoE LoRA on the experts' alignment, without an (adapter, expert) one (off until timed; decode
#: switch ``moe-lora-expert-blocks``), up to MAX_PAIRS pairs (beyond, an expert spans several blocks and each
#: reads every slot's weights); PROGRAM_PER_SLOT: a program per (block, slot), else one per block
EXPERT_BLOCKS = False
MAX_PAIRS = 4096
PROGRAM_PER_SLOT = True


def applies(num_pairs: int, fully_sharded_tp: bool) -> bool:
    """Whether a sorted-path MoE LoRA of ``num_pairs`` pairs runs on the experts' alignment (host state only)."""
    return EXPERT_BLOCKS and not fully_sharded_tp and 0 < num_pairs <= MAX_PAIRS


def fused_moe_lora_expert_blocks(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: chk.Stacked,
                                 lora_b_stacked: chk.Stacked, *, align: AlignResult, topk_ids: torch.Tensor,
                                 topk_weights: Optional[torch.Tensor], token_lora_mapping: torch.Tensor,
                                 adapter_enabled: torch.Tensor, top_k_in: int, mul_routed_weight: bool = False,
                                 config: MoELoRATileConfig, program_per_slot: Optional[bool] = None) -> None:
    """out [M*top_k, S*N] (or [M, top_k, S*N]) += the LoRA delta of every pair with an enabled adapter.

    align: the base alignment of ``topk_ids`` (local expert ids, -1 for pairs to skip) by expert, its blocks of
    ``align.block_size`` rows.  x: [M, K] (``top_k_in`` = top_k) or [M*top_k, K] (1).  The slices' A / B as
    ``fused_moe_lora`` takes them ([L, E, R, K] / [L, E, N, R] each); slices that are views of one A are shrunk
    once.  config: its BLOCK_SIZE_N / _K, NUM_N_SPLITS, warps and stages (BLOCK_SIZE_M is the alignment's).
    program_per_slot: a program per (block, slot), else one per block looping over the slots (default
    ``PROGRAM_PER_SLOT``).
    """
    chk.check_config(config)
    a_slices, b_slices = chk.slices(lora_a_stacked, "lora_a_stacked"), chk.slices(lora_b_stacked, "lora_b_stacked")
    if len(a_slices) != len(b_slices):
        raise ValueError(f"{len(a_slices)} lora_a slices but {len(b_slices)} lora_b slices")
    L, E, R, K = a_slices[0].shape
    m, top_k = chk.check_routing(topk_ids, token_lora_mapping, adapter_enabled, None, L, E, a_slices[0].device)
    numel = m * top_k
    if align.numel != numel:
        raise ValueError(f"the alignment was made for {align.numel} pairs, the routing has {numel}")
    x = chk.check_x(x, a_slices, m, top_k, top_k_in)
    stride_ot, stride_oj, stride_on = chk.out_strides(out, m, top_k)
    chk.check_b(b_slices, L, E, R, x.dtype, out.shape[-1], 0, None)
    if mul_routed_weight and (topk_weights is None or topk_weights.numel() != numel):
        raise ValueError(f"mul_routed_weight needs topk_weights with M*top_k={numel} entries")
    if numel == 0:
        return
    from vllm.lora.ops.triton_ops._moe_lora_expert_block_kernel import moe_lora_expert_block_kernel

    S, n_sizes = len(a_slices), [b.shape[2] for b in b_slices]
    stride_as, stride_bs = chk.uniform_slice_stride(a_slices), chk.uniform_slice_stride(b_slices)
    if stride_as is None or stride_bs is None or len(set(n_sizes)) != 1:
        groups = [[s] for s in range(S)]  # one launch per slice
    else:
        groups = [list(range(S))]
    interp = triton_interpreting()
    blocks = min(align.block_expert_ids.numel(), -(-numel // align.block_size) + min(numel, E))
    slot_groups = L if (PROGRAM_PER_SLOT if program_per_slot is None else program_per_slot) else 1
    for group in groups:
        s0, ns = group[0], len(group)
        N = n_sizes[s0]
        n_splits = max(1, min(config.num_n_splits, -(-N // config.block_size_n)))
        shared = ns > 1 and stride_as == 0
        per_program = ns if shared else 1
        a, b = a_slices[s0], b_slices[s0]
        moe_lora_expert_block_kernel[(blocks * slot_groups * (ns // per_program) * n_splits,)](
            x, a, b, out, topk_weights.reshape(-1) if mul_routed_weight else x,
            align.sorted_token_ids, align.block_expert_ids, align.num_tokens_post_padded, token_lora_mapping,
            adapter_enabled, numel, top_k, top_k_in, K, N, R, L,
            *chk.strides(x, "stride_xm stride_xk").values(),
            stride_as if ns > 1 else 0, *a.stride(),
            stride_bs if ns > 1 else 0, *b.stride(),
            stride_ot, stride_oj, stride_on, sum(n_sizes[:s0]), N,
            n_splits, ns // per_program, per_program, slot_groups,
            MUL_ROUTED_WEIGHT=bool(mul_routed_weight), UPCAST=interp, FP32_PRECISION="ieee" if interp else "tf32x3",
            EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0, BLOCK_M=align.block_size,
            BLOCK_N=config.block_size_n, BLOCK_K=config.block_size_k, BLOCK_R=rank_block(R),
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch_kwargs(x.device))
