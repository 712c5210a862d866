"""The dense LoRA op's sorted path as two launches (``LoRALinearTileConfig.sorted_split``): a split-K shrink over
the slot-sorted token blocks, then an expand with one N tile per program (kernels:
``_lora_linear_sorted_split_kernels.py``; called by ``lora_linear.add_lora_linear``).

Why: at batch 256 of the Qwen3-30B-A3B decode step (12 layers, an H200, twenty-fourth session) the dense LoRA
runs in line as ``lora_linear_sorted_kernel``, 24 x 15.5 us a step for a few MB of data: each of its (block,
slice, N-split) programs walks all of K (16 steps of 128 at K = 2048) to recompute the block's shrink, up to 16
times per block.  Here each shrink program loads one K chunk, and each expand program sums the chunks' fp32
partials and expands one N tile.  ``SORTED_SPLIT`` makes ``lora_linear_config`` give it to every launch of
``SORTED_SPLIT_MIN_TOKENS`` to ``SORTED_SPLIT_MAX_TOKENS`` tokens (decode batches), instead of the sorted kernel and
of the token path's kernels beyond ``SMALL_BATCH_TOKENS``.  On since the twenty-seventh session: the H200 decode
step with LoRA (``decode_switch_ab.py --switches dense-lora-sorted-split --lora-only --rounds 2``, Qwen3-30B-A3B
width, 12 layers) 0.997 / 0.989 / 0.986 of the shipped time at batches 64 / 128 / 256, both rounds alike.
Prefills keep the sorted kernel (not timed with the pair).
"""
from __future__ import annotations

from typing import Callable

import torch

from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2, triton_interpreting

#: whether ``lora_linear_config`` gives launches of ``SORTED_SPLIT_MIN_TOKENS`` to ``SORTED_SPLIT_MAX_TOKENS`` tokens
#: the split pair
SORTED_SPLIT = True
SORTED_SPLIT_MIN_TOKENS = 17
SORTED_SPLIT_MAX_TOKENS = 512
# the expand loads all of its block's partials at once: at most this many fp32 values (64 a thread at 4 warps;
# sm_90 compile: the o projection at 256 tokens, rank 32, took 255 registers with 16 K chunks of 256)
_EXPAND_PARTIALS = 8192


def sorted_split_config(num_tokens: int, K: int, N: int, R: int, dtype: torch.dtype) -> LoRALinearTileConfig:
    """Tiles of the pair: block_m tokens of one slot per block, block_k one shrink program's K chunk (256 columns
    where the expand's partials stay within ``_EXPAND_PARTIALS`` fp32 values, [K chunks, block_m, rank tile],
    else wider: 8 K chunks at K = 2048), block_n one expand program's columns."""
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():
        return LoRALinearTileConfig(block_m=16, block_n=min(n_cap, 64), block_k=min(k_cap, 256), num_warps=4,
                                    num_stages=1, sorted_split=True)
    block_m = 16 if num_tokens <= 128 else (32 if num_tokens <= 1024 else 64)
    max_chunks = max(1, _EXPAND_PARTIALS // (block_m * rank_block(R)))
    block_k = min(k_cap, max(256 if dtype != torch.float32 else 128, next_power_of_2(-(-K // max_chunks))))
    return LoRALinearTileConfig(block_m=block_m, block_n=min(n_cap, 128), block_k=block_k, num_warps=4,
                                num_stages=1, sorted_split=True)


def launch_sorted_split(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta,
                        enabled: torch.Tensor, has_enabled: bool, cfg: LoRALinearTileConfig, ns: int,
                        n_args: list[int], off_args: list[int], stride_as: int, stride_bs: int,
                        scratch: Callable[[tuple[int, ...], torch.device], torch.Tensor]) -> None:
    """The pair for one launch group of ``add_lora_linear`` (its arguments: slices ``ns`` of A / B at
    ``stride_as`` / ``stride_bs`` elements from ``a`` / ``b``, widths ``n_args``, first columns ``off_args``;
    ``meta`` the step's ``LoRALinearMetadata``).  The partials [blocks, ns, K_SPLITS, BLOCK_M, BLOCK_R] fp32
    come from ``scratch`` uninitialised: the expand reads only the blocks the shrink wrote."""
    from vllm.lora.ops.triton_ops import _lora_linear_sorted_split_kernels as kern

    T, K = x.shape
    L, R = a.shape[:2]
    interp = triton_interpreting()
    blocks = -(-T // cfg.block_m) + min(L, T)
    k_splits = -(-K // cfg.block_k)
    block_r = rank_block(R)
    part = scratch((blocks, ns, k_splits, cfg.block_m, block_r), x.device)
    precision = "ieee" if interp else "tf32x3"
    kern.lora_linear_sorted_shrink_kernel[(blocks, ns, k_splits)](
        x, a, part, meta.sorted_token_ids, meta.slot_counts, enabled, T, K, R, L, x.stride(0), x.stride(1),
        stride_as, *a.stride(), *part.stride()[:4], HAS_ENABLED=has_enabled, UPCAST=interp,
        FP32_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
        num_warps=cfg.num_warps, num_stages=1, **pdl_launch_kwargs(x.device))
    kern.lora_linear_sorted_expand_kernel[(blocks, ns, -(-max(n_args) // cfg.block_n))](
        part, b, y, meta.sorted_token_ids, meta.slot_counts, enabled, T, R, L, k_splits, *n_args, *off_args,
        *part.stride()[:4], stride_bs, *b.stride(), y.stride(0), y.stride(1), HAS_ENABLED=has_enabled,
        UPCAST=interp, FP32_PRECISION=precision, EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_J=next_power_of_2(k_splits),
        num_warps=cfg.num_warps, num_stages=1, **pdl_launch_kwargs(x.device))
