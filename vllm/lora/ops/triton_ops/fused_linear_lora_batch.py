"""The fused projection + LoRA op for batches of 17..``BATCH_MAX_TOKENS`` tokens (tensor cores).

Reached through ``fused_linear_lora`` (same contract, read its module docstring), which calls
``launch_batch`` above ``SMALL_BATCH_TOKENS`` tokens.  One launch: tiles of BLOCK_M positions of the
step's slot-sorted token order (``LoRALinearMetadata``, made once per step by the Punica wrapper, or
here when not given) x BLOCK_N columns; the shrink of the tile's first ``LOOP_SLOTS`` slots is
accumulated in the main K loop from the x loads of the base product, the expand is added in the
epilogue and the rows go back to their token order (``_fused_linear_lora_batch_kernel``).

The grouping may describe fewer rows than x has (a CUDA-graph replay runs a batch of n tokens on T >= n
rows, the rows past n on slot -1): its entries past the tokens on a slot are never read, the rows without
a slot are found from the mapping inside the kernel.  No host reads of device values (CUDA-graph safe).
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.kernel_configs.tile_config import FusedLinearLoRABatchTileConfig
from vllm.lora.ops.triton_ops.lora_linear import LoRALinearMetadata, lora_linear_metadata
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.triton_utils import next_power_of_2, triton_interpreting

BATCH_MAX_TOKENS = 256  # largest batch of the fused op (the sorted-order tail lookup is [BLOCK_M, T] per tile)
_MIN_PROGRAMS = 132  # one per SM of an H100 / H200: fewer cannot stream W at full bandwidth
_STAGE_BUDGET = 200 * 1024  # bytes of shared memory the pipeline stages may take (the epilogue needs the rest)


def batch_config(num_tokens: int, K: int, N: int, R: int, dtype: torch.dtype,
                 max_loras: int = 4) -> FusedLinearLoRABatchTileConfig:
    """Tiles of one launch (``fused_linear_lora``'s ``config=`` takes it above 16 tokens, changed by
    ``dataclasses.replace``).

    ``loop_slots`` (0, 1, 2, 4 or 8): how many distinct slots of a tile are shrunk inside the main loop
    (one dot for all; the others after it, each re-reading x): min(max_loras rounded up to a power of
    two, 4).

    On a GPU: BLOCK_M 32 up to 32 tokens, else 64; the widest BLOCK_N in 128 / 64 / 32 / 16 that still
    gives one program per SM (64 tokens: qkv of Qwen3-30B-A3B, N = 5120, 32; o, N = 2048, 16; 256 tokens:
    128 and 32); BLOCK_K 128 (32 in fp32), narrower where two stages of the rank's A tiles would not fit;
    4, 3 or 2 stages.  Untimed so far: ``benchmark_fused_linear_lora.py --sweep``.
    """
    loop_slots = min(next_power_of_2(max(max_loras, 1)), 4)
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():  # ~5 ms per loop iteration per program: few programs, one K tile
        return FusedLinearLoRABatchTileConfig(block_m=32 if num_tokens <= 32 else 64, block_n=min(n_cap, 128),
                                              block_k=min(k_cap, 256), loop_slots=loop_slots, num_warps=4,
                                              num_stages=1)
    block_m = 32 if num_tokens <= 32 else 64
    m_tiles = -(-num_tokens // block_m)
    block_n = next((bn for bn in (128, 64, 32) if m_tiles * -(-N // bn) >= _MIN_PROGRAMS), 16)
    block_k = min(k_cap, 32 if dtype == torch.float32 else 128)

    def stage_bytes(bk: int) -> int:  # one pipeline stage: the x, W and gathered A tiles (BLOCK_C = rank x slots)
        return (block_m + block_n + rank_block(R) * max(loop_slots, 1)) * bk * dtype.itemsize

    # 4 stages where they fit in an H100's shared memory (227 KB, of which _STAGE_BUDGET for the stages), else 3,
    # else 2, narrowing BLOCK_K until 2 fit (rank 32 at 256 tokens: 3 stages of 80 KB did not, on an H200)
    while block_k > 32 and 2 * stage_bytes(block_k) > _STAGE_BUDGET:
        block_k //= 2
    stages = next((st for st in (4, 3) if st * stage_bytes(block_k) <= _STAGE_BUDGET), 2)
    return FusedLinearLoRABatchTileConfig(block_m=block_m, block_n=block_n, block_k=block_k, loop_slots=loop_slots,
                                          num_warps=4, num_stages=stages)


def _check_meta(meta: LoRALinearMetadata, T: int, L: int, device: torch.device) -> None:
    ids, counts = meta.sorted_token_ids, meta.slot_counts
    if ids.dim() != 1 or ids.shape[0] < T or ids.dtype != torch.int32 or ids.device != device:
        raise ValueError(f"meta.sorted_token_ids must be int32 [>= T={T}] on {device}, got {ids.dtype} "
                         f"{tuple(ids.shape)} on {ids.device}")
    if counts.dim() != 1 or counts.shape[0] != L or counts.dtype != torch.int32 or counts.device != device:
        raise ValueError(f"meta.slot_counts must be int32 [max_loras={L}] on {device}, got {counts.dtype} "
                         f"{tuple(counts.shape)} on {counts.device}")


def launch_batch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a: torch.Tensor,
                 b: torch.Tensor, y: torch.Tensor, mapping: torch.Tensor, adapter_enabled: Optional[torch.Tensor],
                 n_sizes: list[int], offs: list[int], stride_as: int, stride_bs: int,
                 meta: Optional[LoRALinearMetadata], config: Optional[FusedLinearLoRABatchTileConfig]) -> None:
    """One launch of the batch kernel; the arguments were checked by ``fused_linear_lora``.  ``a`` / ``b``:
    slice 0's A / B (the others at ``stride_as`` / ``stride_bs`` elements), ``y`` written in full."""
    from vllm.lora.ops.triton_ops._fused_linear_lora_batch_kernel import fused_linear_lora_batch_kernel

    T, K = x.shape
    N = weight.shape[0]
    L, R = a.shape[:2]
    if T > BATCH_MAX_TOKENS:
        raise ValueError(f"fused_linear_lora takes at most {BATCH_MAX_TOKENS} tokens, got {T}; "
                         "use F.linear then add_lora_linear for larger batches")
    if meta is None:
        meta = lora_linear_metadata(mapping[:T], L)
    _check_meta(meta, T, L, x.device)
    cfg = config if config is not None else batch_config(T, K, N, R, x.dtype, L)
    if not isinstance(cfg, FusedLinearLoRABatchTileConfig):
        raise TypeError(f"at {T} > 16 tokens config must be a FusedLinearLoRABatchTileConfig (batch_config, "
                        f"changed by dataclasses.replace), got {type(cfg).__name__}")
    loop_slots = cfg.loop_slots
    if loop_slots not in (0, 1, 2, 4, 8):
        raise ValueError(f"config LOOP_SLOTS must be 0, 1, 2, 4 or 8, got {loop_slots}")
    interp = triton_interpreting()
    S = len(n_sizes)
    pad = 3 - S
    grid = (-(-T // cfg.block_m), -(-N // cfg.block_n))
    fused_linear_lora_batch_kernel[grid](
        x, weight, bias if bias is not None else weight, a, b, y, mapping, meta.sorted_token_ids,
        meta.slot_counts, adapter_enabled if adapter_enabled is not None else mapping,
        T, N, K, R, L, *(n_sizes + [0] * pad), *(offs + [0] * pad),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        stride_as, *a.stride(), stride_bs, *b.stride(), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_ENABLED=adapter_enabled is not None, NUM_SLICES=S if R > 0 else 0,
        UPCAST=interp, BASE_PRECISION="ieee", FP32_PRECISION="ieee" if interp else "tf32x3",
        EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0, LOOP_SLOTS=loop_slots,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=rank_block(R),
        BLOCK_C=rank_block(R) * max(loop_slots, 1),
        BLOCK_L=next_power_of_2(max(L, 2)), BLOCK_TAIL=next_power_of_2(max(T, 16)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
