"""Kernel configurations (tiles, N-splits, warps) of the MoE LoRA ops.

A config is a ``MoELoRATileConfig`` (``vllm.kernel_configs.tile_config``: the torch ops take
one too, and ignore it) read by the launchers in ``fused_moe_lora.py`` (field, and its key in
a tuned file):

    block_size_m  BLOCK_SIZE_M  rows of one M-block (sorted path; the alignment is made
                                with it - the launcher takes the alignment's value)
    block_size_n  BLOCK_SIZE_N  output columns per expand tile
    block_size_k  BLOCK_SIZE_K  reduction columns per shrink tile
    num_n_splits  NUM_N_SPLITS  programs sharing one (block or pair, slice)'s N range; each
                                recomputes the (cheap) shrink, so small batches fill the GPU
    num_warps, num_stages
    shrink_split_k SHRINK_SPLIT_K  1 (default): one fused launch; n > 1: the fused op on sorted
                                routing as a shrink split along K over n programs + an
                                expand launch (``moe_lora_split.py``; the heuristic keeps 1)

Tile rules (FACTS.md section 4): the rank tile BLOCK_R is next_pow2(max(R, 16))
and is not configurable - the shrink's N tile and the expand's K tile are the
whole rank.  ``use_tuned_config`` first asks ``vllm.kernel_configs`` for a
tuned file (key E, K, N, R; table indexed by token count), then fills the keys
it lacks from the heuristic below; an unknown key there is an error naming the file.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from vllm import envs
from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.triton_utils import next_power_of_2, triton_interpreting

__all__ = ["MoELoRATileConfig", "get_moe_lora_config", "rank_block", "use_small_batch_path"]


# the per-pair path (no (adapter, expert) alignment) while num_pairs * this <= experts * slots (upstream: 8)
# and num_pairs <= SMALL_BATCH_MAX_PAIRS, at kernel ranks up to SMALL_BATCH_WIDE_MAX_RANK (above: upstream's 8).  At 16-64 Qwen3-30B-A3B tokens (4 slots) most (adapter, expert) groups
# hold 1-2 pairs, so sorting buys little and its alignment costs more.  H200 A/B (benchmark_moe_lora.py --tokens
# 8 16 32 64 --pair-path-factor 1, the whole layer with LoRA, us): Qwen3 16 / 32 / 64 tokens 248.5 -> 233.7 /
# 320.4 -> 303.7 / 374.8 -> 343.1; gpt-oss-20b 8 / 16 / 32 tokens 284.5 -> 276.2 / 374.3 -> 362.4 / 450.5 ->
# 438.8; Mixtral-8x7B 8 tokens 727.1 -> 651.0, 16 tokens 728.3 -> 742.6
# Twenty-second session: factor 0.5 and up to 1024 pairs, since the path's two launches with the expand fan-out
# (fused_moe_lora.PAIR_SPLIT_MIN_WORK) beat the sorted path up to about twice as many pairs as groups (H200,
# --pair-path-factor 0.5 --pair-path-max-pairs 1024, whole layer with LoRA, us, rank 16): Mixtral-8x7B 24 / 32
# tokens 753.6 / 760.9 -> 696.9 / 710.0; gpt-oss-20b 48 / 64 tokens 469.9 / 469.1 -> 438.3 / 444.2; Qwen3 96 / 128
# tokens 378.2 / 387.2 -> 363.3 / 381.0.  Beyond, it lost (factor 0.25: Qwen3 256 tokens 408.3 -> 459.7, gpt-oss
# 128 tokens 538.9 -> 548.4, Mixtral 64 tokens 731.5 -> 756.4)
SMALL_BATCH_PAIRS_FACTOR = 0.5
SMALL_BATCH_MAX_PAIRS = 1024  # the most pairs timed on that path (Qwen3, 128 tokens x top-8)
# rank 64 on the wide per-pair path lost (H200, benchmark_moe_lora.py --ranks 64, whole layer with LoRA vs the
# same LoRA as separate launches: Qwen3 16 / 64 tokens 468.7 / 1147.2 us vs 301.3 / 531.7): every N split of the
# fused per-pair kernel redoes the shrink, 4x longer at rank 64.  Up to rank 32 the wide path took the decode step
# with LoRA from 3.68 / 5.49 ms to 3.44 / 5.15 ms at batch 16 / 64 (benchmark_decode.py, async; measured when the
# benchmark's rank-16 adapters were believed to run w13 at rank 32 - they run two slices at rank 16)
SMALL_BATCH_WIDE_MAX_RANK = 32
_UPSTREAM_PAIRS_FACTOR = 8


# the per-pair kernel's tiles at kernel ranks 32 and 64: K tiles of 512 (not 8192 / BLOCK_R) and 8 warps.  sm_90
# static report (ptxas, dependent global-memory round trips of one program; benchmarks/kernels/
# lora_linear_static_report.py --moe --moe-widths qwen3 mixtral gpt-oss --rank 64): the old tiles compile the K loop into one round trip per tile or
# worse - rank 64: Qwen3-30B-A3B w13 103 -> 9 trips, Mixtral-8x7B w13 / w2 97 / 617 -> 22 / 58; rank 32: Qwen3
# w13 15 -> 8, gpt-oss-20b w13 / w2 80 / 88 -> 10 / 11; no spills.  The H200 figures of the old tiles: Mixtral
# rank 64, 1 token, LoRA 794.7 us over a base of 186.5.  Not yet timed (gpu_check.sh variants)
WIDE_RANK_PAIR_TILES = True


def use_small_batch_path(num_pairs: int, num_experts: int, max_loras: int, rank: int) -> bool:
    """True when the pairs are so few that sorting would only make padding (FACTS.md section 4).

    The per-pair kernel also handles ``expert_map``, so unlike upstream it is
    not excluded under expert parallelism.
    """
    factor = SMALL_BATCH_PAIRS_FACTOR if rank <= SMALL_BATCH_WIDE_MAX_RANK else _UPSTREAM_PAIRS_FACTOR
    return num_pairs * factor <= num_experts * max_loras and num_pairs <= SMALL_BATCH_MAX_PAIRS


def rank_block(rank: int) -> int:
    """BLOCK_R: the rank tile, a power of two >= 16 (tl.dot needs 16)."""
    return next_power_of_2(max(int(rank), 16))


def _op_kind(op: str) -> str:
    if "shrink" in op:
        return "shrink"
    if "expand" in op:
        return "expand"
    return "fused"


def _interpreter_config(num_pairs: int, K: int, N: int) -> MoELoRATileConfig:
    # ~5 ms per loop iteration per program: one K tile, one N tile, few programs.
    return MoELoRATileConfig(block_size_m=32 if num_pairs > 256 else 16,
                             block_size_n=min(next_power_of_2(max(N, 16)), 512),
                             block_size_k=min(next_power_of_2(max(K, 16)), 512), num_n_splits=1, num_warps=4,
                             num_stages=1)


def _gpu_config(kind: str, num_pairs: int, num_experts: int, max_loras: int, rank: int, K: int, N: int,
                num_slices: int, small_batch: Optional[bool] = None) -> MoELoRATileConfig:
    """Heuristic fitted to a sweep on an H200 (Qwen3-30B-A3B shapes, R=16, 4 adapters, cold L2).

    Both kernels are memory/latency bound: few programs at decode need N-splits;
    from ~64 tokens on, one program per block and slice is best.
    """
    block_r = rank_block(rank)
    n_cap = next_power_of_2(max(N, 16))
    k_cap = next_power_of_2(max(K, 16))
    warps, stages = 4, 3
    if use_small_batch_path(num_pairs, num_experts, max_loras, rank) if small_batch is None else small_batch:
        # Per-pair kernel: a [BLOCK_R, BLOCK_K] fp32 partial-product tile and [BLOCK_N, BLOCK_R] B tiles.
        block_m = 16
        block_k = min(8192 // block_r, 512, k_cap)
        block_n = min(128, n_cap)
        programs = max(1, num_pairs) * num_slices
        # Wide expands (w2: N=H > K=I) want many splits and 8 warps; for w13 the
        # shrink (K=H) recomputed by every split makes fewer splits better.
        target = 256 if N > K else 128
        warps = 8 if N > K else 4
        if WIDE_RANK_PAIR_TILES and 32 <= block_r <= 64:
            block_k, warps, stages = min(512, k_cap), 8, 2
    else:
        groups = num_experts * max_loras
        avg = num_pairs / groups
        block_m = 16 if avg <= 24 else (32 if avg <= 96 else 64)
        block_n = min(256 if num_pairs <= 512 else (128 if block_m <= 32 else 64), n_cap)
        if block_r <= 32:
            block_k = min(256 if num_pairs <= 128 else 128, k_cap)
        else:
            block_k = min(128 if num_pairs <= 128 else 64, k_cap)
        # Blocks that will hold pairs: at least one per touched group, at least numel / BLOCK_M.
        est_blocks = max(min(groups, num_pairs), math.ceil(num_pairs / block_m))
        programs = est_blocks * num_slices
        target = 200
    n_tiles = max(1, math.ceil(N / block_n))
    splits = 1 if kind == "shrink" else max(1, min(n_tiles, 16, math.ceil(target / max(programs, 1))))
    return MoELoRATileConfig(block_size_m=block_m, block_size_n=block_n, block_size_k=block_k, num_n_splits=splits,
                             num_warps=warps, num_stages=stages)


def get_moe_lora_config(
    op: str,
    *,
    num_pairs: int,
    num_experts: int,
    max_loras: int,
    rank: int,
    K: int,
    N: int,
    num_slices: int,
    dtype: torch.dtype,
    use_tuned_config: bool,
    device_name: str,
    num_tokens: Optional[int] = None,
    small_batch: Optional[bool] = None,
) -> MoELoRATileConfig:
    """Tile config of one MoE LoRA launch.

    op: name of the op, e.g. "fused_moe_lora_w13", "fused_moe_lora_w2",
        "moe_lora_shrink_w13", "moe_lora_expand_w2"; it names the tuned file and
        its "shrink" / "expand" part selects the heuristic (default: fused).
    num_pairs: M * top_k. num_experts: E_local. rank: max LoRA rank R.
    K: shrink reduction size (H for w13, I_part for w2). N: columns of one slice.
    num_tokens: the token count to look up in a tuned table (default num_pairs).
    small_batch: the path the launch takes (True: the per-pair kernel, False: sorted), when the caller has
        decided it (a layer's w13 and w2 take one path); None: ``use_small_batch_path`` at this op's rank.
    device_name: e.g. torch.cuda.get_device_name(); "cpu" selects interpreter tiles.
    """
    del dtype  # the heuristic is the same for bf16/fp16/fp32 so far
    interp = device_name == "cpu" or triton_interpreting()
    tuned_folder = envs.VLLM_TUNED_CONFIG_FOLDER if use_tuned_config else None  # part of the cache key
    return _cached_config(op, int(num_pairs), int(num_experts), int(max_loras), int(rank), int(K), int(N),
                          int(num_slices), use_tuned_config, device_name,
                          int(num_pairs if num_tokens is None else num_tokens), interp, tuned_folder, small_batch)


@functools.lru_cache(maxsize=4096)
def _cached_config(op: str, num_pairs: int, num_experts: int, max_loras: int, rank: int, K: int, N: int,
                   num_slices: int, use_tuned_config: bool, device_name: str, num_tokens: int, interp: bool,
                   tuned_folder: Optional[str], small_batch: Optional[bool]) -> MoELoRATileConfig:
    if interp:
        cfg = _interpreter_config(num_pairs, K, N)
    else:
        cfg = _gpu_config(_op_kind(op), num_pairs, num_experts, max_loras, rank, K, N, num_slices, small_batch)
    if use_tuned_config:
        from vllm.kernel_configs.tile_config import tuned_tiles

        key = {"E": num_experts, "K": K, "N": N, "R": rank}
        cfg = tuned_tiles(cfg, op, key, num_tokens, device_name)
    return cfg
