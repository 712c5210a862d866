"""What ``tune_moe.py`` tunes: the tuned-file names and keys the kernels look up, the heuristic
configs, and the pruned search spaces.  Pure functions, unit-tested on CPU.

The one place that knows what a tile config *is* (a typed ``TileConfig`` for the GEMM, a
``MoELoRATileConfig`` for the LoRA op; their JSON form is the tuned files') is the four "config
adapters" below: ``heuristic_gemm_config``, ``heuristic_lora_config``,
``as_plain`` and ``launch_config``.  Everything else in the tuner handles plain ``dict[str, int]``.

Files and keys, as the kernels look them up (``vllm.kernel_configs.lookup_tuned_config``):

    GEMM1 (w13): op fused_moe_gemm,      key {E, N=2I, K=H},  table indexed by tokens M
    GEMM2 (w2):  op fused_moe_gemm,      key {E, N=H, K=I},   table indexed by pairs M*top_k
                 (``TritonExperts`` asks for GEMM2's config with top_k=1, so its count is the pairs)
    LoRA w13:    op fused_moe_lora_w13,  key {E, K=H, N=I, R}, table indexed by pairs M*top_k
    LoRA w2:     op fused_moe_lora_w2,   key {E, K=I, N=H, R}, table indexed by pairs M*top_k

Both GEMMs walk one expert alignment made with GEMM1's BLOCK_SIZE_M (``TritonExperts._route``
drops GEMM2's), and the w2 LoRA reuses the w13 LoRA alignment (``add_lora_w2``): so BLOCK_SIZE_M is
searched for w13 only and w2 is tuned with w13's winner.  LoRA files have no adapter-count key while
the path (small-batch or sorted) depends on it: they are tuned at ``--num-loras`` adapters.

Search spaces (grid -> filters -> the ``max_candidates`` nearest to the heuristic, heuristic first):

GEMM: BLOCK_SIZE_M 16..128 (w13 only; at most 2 x next_pow2(pairs per expert), at least 16),
    BLOCK_SIZE_N 32..256 and BLOCK_SIZE_K 64..256 (capped by N, K), GROUP_SIZE_M {1, 8} (only with
    16+ M-blocks, else the heuristic's), num_warps {4, 8}, num_stages {3, 4}.  Filters: shared memory
    stages x (BM + BN) x BK x bytes <= 227 KiB; fp32 accumulator <= 256 registers per thread
    (BM x BN <= 8192 x warps); 8 warps only for tiles of 4096+ elements.
LoRA: BLOCK_SIZE_M {16, 32, 64} (w13 sorted path only), BLOCK_SIZE_N 32..256, BLOCK_SIZE_K 32..256
    (small-batch path: up to 512 with BLOCK_R x BLOCK_K <= 8192), NUM_N_SPLITS 1..16 (<= N tiles),
    num_warps {4, 8}, num_stages {2, 3}.
LoRA split-K variant (``--shrink-splits``, sorted path only, added after the nearest candidates): the
    heuristic with SHRINK_SPLIT_K in the given list (splits that leave >= 2 K ranges) x NUM_N_SPLITS in
    {the heuristic's, one N tile per program} x num_stages in {the heuristic's, 1} x num_warps {4, 8}.
Distance to the heuristic: the sum over the keys of |log2 a - log2 b| (warps, stages, GROUP_SIZE_M:
    |a - b| / a step), so the kept candidates are the heuristic's neighbourhood, not a random subset.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, Optional

import torch

SMEM_BYTES = 227 * 1024  # Hopper: the most dynamic shared memory one block may use
GEMM_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
LORA_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "NUM_N_SPLITS", "num_warps", "num_stages")
Config = dict[str, int]


# ---- config adapters: the only code that knows the kernels' config type ---------------------
def as_plain(cfg: Any, keys: Iterable[str]) -> Config:
    """A kernel config (a typed tile config, or a dict) -> a plain JSON-ready dict of the tunable ``keys``."""
    raw = cfg.to_json() if hasattr(cfg, "to_json") else dict(cfg)
    return {k: int(raw[k]) for k in keys if k in raw}


def heuristic_gemm_config(pairs: int, E: int, N: int, K: int, top_k: int, dtype: torch.dtype,
                          on_gpu: bool) -> Config:
    """The grouped GEMM's config without tuned files: the GPU heuristic, or the interpreter's tiles."""
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as g

    if on_gpu:  # not get_fused_moe_config: that one would return shipped tuned files
        return as_plain(g._gpu_config(pairs, E, N, K, dtype), GEMM_KEYS)
    return as_plain(g.get_fused_moe_config(pairs, E, N, K, top_k, dtype), GEMM_KEYS)


def heuristic_lora_config(op: str, *, pairs: int, E: int, L: int, R: int, K: int, N: int, S: int,
                          dtype: torch.dtype, device_name: str, small_batch: Optional[bool] = None) -> Config:
    """The MoE LoRA op's config without tuned files (``small_batch``: the layer's path, when decided at another
    rank than this op's, as the Punica wrapper decides it)."""
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

    return as_plain(get_moe_lora_config(op, num_pairs=pairs, num_experts=E, max_loras=L, rank=R, K=K, N=N,
                                         num_slices=S, dtype=dtype, use_tuned_config=False,
                                         device_name=device_name, small_batch=small_batch), LORA_KEYS)


def launch_config(cfg: Config) -> Any:
    """A plain config -> what the launchers' ``config=`` takes: a ``MoELoRATileConfig`` for the LoRA
    op's keys (NUM_N_SPLITS present), else a ``TileConfig`` (the GEMM's); a stray key is an error."""
    from vllm.kernel_configs.tile_config import MoELoRATileConfig, TileConfig

    cls = MoELoRATileConfig if "NUM_N_SPLITS" in cfg else TileConfig
    return cls.from_json(cfg, source=f"tune_moe config {cfg}")


# ---- tuned files: names and table indices, as the kernels look them up ----------------------
def tuned_file_keys(H: int, I: int, E: int, top_k: int, M: int, R: int) -> dict[str, tuple[str, dict, int]]:
    """kernel -> (op, file key, table index) for one layer shape at M tokens (see the module doc)."""
    pairs = M * top_k
    return {"gemm_w13": ("fused_moe_gemm", {"E": E, "N": 2 * I, "K": H}, M),
            "gemm_w2": ("fused_moe_gemm", {"E": E, "N": H, "K": I}, pairs),
            "lora_w13": ("fused_moe_lora_w13", {"E": E, "K": H, "N": I, "R": R}, pairs),
            "lora_w2": ("fused_moe_lora_w2", {"E": E, "K": I, "N": H, "R": R}, pairs)}


# ---- search spaces ---------------------------------------------------------------------------
def _pow2(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _distance(cfg: Config, ref: Config) -> float:
    d = 0.0
    for k, v in cfg.items():
        r = ref.get(k, v)
        if k in ("num_warps", "GROUP_SIZE_M"):
            d += v != r
        elif k == "num_stages":
            d += abs(v - r)
        else:
            d += abs(math.log2(v) - math.log2(r))
    return d


def _nearest(cands: list[Config], ref: Config, limit: int) -> list[Config]:
    """``ref`` first, then the ``limit - 1`` candidates nearest to it (stable for ties)."""
    seen, out = {tuple(sorted(ref.items()))}, []
    for c in sorted(cands, key=lambda c: _distance(c, ref)):
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return [ref] + out[: max(limit - 1, 0)]


def gemm_candidates(heur: Config, *, pairs: int, E: int, N: int, K: int, elt_bytes: int,
                    fixed_block_m: Optional[int], limit: int) -> list[Config]:
    """Candidate GEMM configs, the heuristic first.  ``fixed_block_m``: GEMM2 (the shared alignment's)."""
    if fixed_block_m is not None:
        heur = dict(heur, BLOCK_SIZE_M=fixed_block_m)
        bms = [fixed_block_m]
    else:
        cap = max(16, 2 * _pow2(pairs / max(E, 1)))
        bms = [bm for bm in (16, 32, 64, 128) if bm <= cap]
    bns = [bn for bn in (32, 64, 128, 256) if bn <= max(_pow2(N), 32)]
    bks = [bk for bk in (64, 128, 256) if bk <= max(_pow2(K), 64)]
    cands = []
    for bm, bn, bk, warps, stages in itertools.product(bms, bns, bks, (4, 8), (3, 4)):
        groups = (1, 8) if pairs / bm >= 16 else (heur["GROUP_SIZE_M"],)
        if stages * (bm + bn) * bk * elt_bytes > SMEM_BYTES or bm * bn > 8192 * warps:
            continue
        if warps == 8 and bm * bn < 4096:
            continue
        for group in groups:
            cands.append(dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group,
                              num_warps=warps, num_stages=stages))
    return _nearest(cands, heur, limit)


def lora_candidates(heur: Config, *, sorted_path: bool, tune_block_m: bool, R: int, K: int, N: int,
                    limit: int) -> list[Config]:
    """Candidate MoE LoRA configs, the heuristic first.  ``tune_block_m``: w13 on the sorted path."""
    block_r = _pow2(max(R, 16))
    bms = (16, 32, 64) if (sorted_path and tune_block_m) else (heur["BLOCK_SIZE_M"],)
    bns = [bn for bn in (32, 64, 128, 256) if bn <= max(_pow2(N), 32)]
    bks = [bk for bk in ((32, 64, 128, 256) if sorted_path else (64, 128, 256, 512)) if bk <= max(_pow2(K), 32)]
    if not sorted_path:
        bks = [bk for bk in bks if block_r * bk <= 8192] or [min(bks)]
    cands = []
    for bm, bn, bk, warps, stages in itertools.product(bms, bns, bks, (4, 8), (2, 3)):
        n_tiles = -(-N // bn)
        for splits in (1, 2, 4, 8, 16):
            if splits > n_tiles:
                break
            cands.append(dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, NUM_N_SPLITS=splits,
                              num_warps=warps, num_stages=stages))
    return _nearest(cands, heur, limit)


def split_candidates(heur: Config, *, K: int, N: int, splits: Iterable[int]) -> list[Config]:
    """The split-K variant of the LoRA op around the heuristic (``moe_lora_split.py``): each K split
    count that gives >= 2 ranges, with the heuristic's N-splits and with one N tile per program, with the
    heuristic's stages and with one (the expand's B tile then loads with the output rows, not before), at
    4 and 8 warps (ptxas keeps more of the shrink's loads in flight at some widths with 8)."""
    from vllm.lora.ops.triton_ops.moe_lora_split import split_layout

    n_tiles = -(-N // heur["BLOCK_SIZE_N"])
    out, seen = [], set()
    for s in splits:
        if split_layout(K, s)[1] < 2:
            continue
        for n, stages, warps in itertools.product((heur["NUM_N_SPLITS"], min(n_tiles, 16)), (heur["num_stages"], 1),
                                                  (4, 8)):
            c = dict(heur, SHRINK_SPLIT_K=s, NUM_N_SPLITS=n, num_stages=stages, num_warps=warps)
            if tuple(sorted(c.items())) not in seen:
                seen.add(tuple(sorted(c.items())))
                out.append(c)
    return out


def interpreter_candidates(heur: Config, kind: str, *, tune_block_m: bool, limit: int) -> list[Config]:
    """--smoke on a CPU: a few interpreter-friendly variants (one K tile, few programs)."""
    keys = GEMM_KEYS if kind == "gemm" else LORA_KEYS
    variants = [dict(heur, BLOCK_SIZE_N=max(16, heur["BLOCK_SIZE_N"] // 2))]
    if tune_block_m:
        variants.append(dict(heur, BLOCK_SIZE_M=2 * heur["BLOCK_SIZE_M"]))
    if kind == "lora":
        variants.append(dict(heur, BLOCK_SIZE_N=max(16, heur["BLOCK_SIZE_N"] // 2), NUM_N_SPLITS=2))
    return _nearest([{k: c[k] for k in keys if k in c} for c in variants], heur, limit)
