"""``benchmark_moe_int4.py --sweep`` / ``--tune-out``: the int4 GEMM alone per shape, token count and GEMM,
with the heuristic's tiles, each code-unpacking mode (``UNPACK`` 0-4) of the tl.dot kernels, the FMA GEMV
(``GEMV``: one row per program on unsorted small-batch launches, BLOCK_SIZE_M rows per block on sorted ones)
and a pruned grid of alternatives, each checked against the heuristic's output first; the fastest written as
tuned files (op ``int4_moe_gemm``).  On sorted launches the tuned entry keeps the heuristic's kernel and
BLOCK_SIZE_M (both GEMMs share one alignment: ``TritonInt4Experts`` aligns once with GEMM1's BLOCK_SIZE_M);
the other kernel's time is still a column (flip ``GEMV_SORTED_MAX_ROWS`` in int4_moe_gemm.py if it wins)."""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

import benchmarks.kernels.benchmark_moe_lora as lb

# the heuristic's tiles with each code-unpacking mode (the heuristic's own among them); modes 1 and 2
# keep [BK, BN] words in shared memory (4x mode 0's), so they run with fewer stages; 3 runs as 0 where
# a K-tile spans two groups (see int4_moe_gemm.unpack3_applies)
# (the tl.dot kernel at its own heuristic tiles); "GEMV": the FMA GEMV at its heuristic tiles
# UNPACK 3 also with 3 and 2 stages: the stages its heuristic (UNPACK_DECODE_TILES) falls back to where 4 would not
# fit shared memory (int4_dot_smem.py); at 16-64 tokens of Qwen3-30B-A3B / Mixtral-8x7B these columns
# decided UNPACK_DECODE_TILES (4-32 rows per expert: 16x128x128 and 32x128x128 tiles; on since the H200 A/B)
# (0 and 3 with 4 stages stated: the heuristic's own tiles may carry UNPACK 4's one stage)
UNPACK_VARIANTS = {"UNPACK 0": dict(UNPACK=0, num_stages=4), "UNPACK 1": dict(UNPACK=1, num_stages=2),
                   "UNPACK 2": dict(UNPACK=2, num_stages=2), "UNPACK 3": dict(UNPACK=3, num_stages=4),
                   "UNPACK 3 s3": dict(UNPACK=3, num_stages=3), "UNPACK 3 s2": dict(UNPACK=3, num_stages=2),
                   # the operands swapped (not pipelined: one stage), at the heuristic's and two other widths
                   "UNPACK 4": dict(UNPACK=4, num_stages=1), "UNPACK 5": dict(UNPACK=5, num_stages=3),
                   "UNPACK 5 s4 n256 w8": dict(UNPACK=5, num_stages=4, BLOCK_SIZE_N=256, num_warps=8),
                   # the 64-row tier (K-tile 64 in the heuristic: 4 and 5 need 128)
                   "UNPACK 5 k128": dict(UNPACK=5, num_stages=3, BLOCK_SIZE_K=128),
                   "UNPACK 5 k128 n256 w8": dict(UNPACK=5, num_stages=3, BLOCK_SIZE_K=128, BLOCK_SIZE_N=256,
                                                 num_warps=8),
                   "UNPACK 4 n64": dict(UNPACK=4, num_stages=1, BLOCK_SIZE_N=64),
                   "UNPACK 4 n256 w8": dict(UNPACK=4, num_stages=1, BLOCK_SIZE_N=256, num_warps=8),
                   # where the heuristic's K-tile is 64 (UNPACK 4 needs 128; else it runs 0), and 0 unpipelined
                   "UNPACK 4 k128": dict(UNPACK=4, num_stages=1, BLOCK_SIZE_K=128),
                   "UNPACK 4 k128 n256 w8": dict(UNPACK=4, num_stages=1, BLOCK_SIZE_K=128, BLOCK_SIZE_N=256,
                                                 num_warps=8),
                   "UNPACK 0 s1": dict(UNPACK=0, num_stages=1),
                   "UNPACK 0 n256 w8 s1": dict(UNPACK=0, num_stages=1, BLOCK_SIZE_N=256, num_warps=8),
                   "GEMV": dict(GEMV=1)}


def swap_candidates():
    """UNPACK 5 (the operands swapped, pipelined) alternatives: widths, K-tiles, K splits, warps, stages."""
    for bn in (64, 128, 256):
        for bk in (128, 256):
            for split in (1, 2, 4):
                for warps, stages in ((4, 3), (4, 4), (8, 3)):
                    yield dict(BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, SPLIT_K=split, num_warps=warps, num_stages=stages,
                               UNPACK=5)


def gemv_candidates():
    """The FMA GEMV's alternatives (unsorted launches): tiles, K splits, warps."""
    for bn in (64, 128, 256):
        for bk in (128, 256, 512):
            for split in (1, 2, 4, 8, 16):
                yield dict(BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, SPLIT_K=split, num_warps=4, num_stages=1, GEMV=1)
    for warps in (2, 8):
        for split in (2, 4, 8, 16):
            yield dict(BLOCK_SIZE_N=128, BLOCK_SIZE_K=256, SPLIT_K=split, num_warps=warps, num_stages=1, GEMV=1)


def gemv_rows_candidates(bm: int):
    """The multi-row GEMV's alternatives (sorted launches) at BLOCK_SIZE_M ``bm``: tiles, K splits, warps."""
    for bn in (64, 128, 256):
        for bk in (32, 64, 128, 256):
            if bm * bk > 512:  # the [bm, bk / 8, bn] accumulators: beyond this they spill
                continue
            for split in (1, 2, 4, 8):
                yield dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, SPLIT_K=split, num_warps=4,
                           num_stages=1, GEMV=1)


def sweep_candidates():
    for bn in (64, 128, 256):
        for bk in (64, 128, 256):
            for split in (1, 2, 4, 8):
                for stages in (3, 4):
                    yield dict(BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, SPLIT_K=split, num_stages=stages)
    for unpack in (1, 2):
        for bn in (64, 128):
            for split in (1, 2, 4, 8):
                yield dict(BLOCK_SIZE_N=bn, BLOCK_SIZE_K=64, SPLIT_K=split, num_stages=3, UNPACK=unpack)
    for bn in (64, 128, 256):
        for bk in (128, 256):
            for split in (1, 2, 4, 8):
                for stages in (2, 3, 4):
                    yield dict(BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, SPLIT_K=split, num_stages=stages, UNPACK=3)
    yield from swap_candidates()


def sweep(q_layer, case, tokens, args, dtype, device, flush, tuned: dict) -> list[str]:
    """Markdown rows: per token count and GEMM, heuristic vs best tiles; fills ``tuned`` (file key -> table)."""
    from vllm.kernel_configs.tile_config import Int4TileConfig
    from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import (
        get_int4_moe_config,
        invoke_int4_moe_gemm,
        use_unsorted_int4_gemm,
    )
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size

    qc = q_layer.quant_method.kernel.fused_experts.quant_config
    lines = []
    if device.type == "cuda":
        timed = lambda fn: lb.time_cuda(fn, flush, args.reps, not args.no_graph)[0]  # noqa: E731
        candidates, g_candidates = list(sweep_candidates()), list(gemv_candidates())
    else:  # --smoke on CPU: exercise the sweep with a few candidates
        timed = lambda fn: lb.time_cpu(fn, 1)[0]  # noqa: E731
        candidates = [dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, SPLIT_K=s, num_stages=1) for s in (1, 2)]
        g_candidates = [dict(BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, SPLIT_K=2, num_stages=1, GEMV=1)]
    variants = {name: (dict(v, num_stages=1) if device.type != "cuda" else v) for name, v in UNPACK_VARIANTS.items()}
    for M in tokens:
        x, _, _, ti, _ = lb.make_inputs(case, M, 1, dtype, device, args.seed)
        pairs, E = M * case.k, case.E
        unsorted = use_unsorted_int4_gemm(pairs, E)
        act = torch.randn(pairs, qc.w2.k, device=device).to(dtype)
        for name, w, a, top_k_in in (("w13", qc.w13, x, case.k), ("w2", qc.w2, act, 1)):
            base = get_int4_moe_config(pairs, E, w.n, w.k, w.group_size, dtype, sorted_pairs=not unsorted)
            # the dot kernel's and the GEMV's own heuristic tiles: each candidate starts from its kernel's
            dot_base = get_int4_moe_config(pairs, E, w.n, w.k, w.group_size, dtype, sorted_pairs=not unsorted,
                                           gemv=False)
            gemv_base = get_int4_moe_config(pairs, E, w.n, w.k, w.group_size, dtype, sorted_pairs=not unsorted,
                                            gemv=True)
            routes: dict = {}  # BLOCK_SIZE_M -> routing (sorted: one alignment per block size)

            def route_for(cfg):
                if unsorted:
                    return dict(pair_expert_ids=ti.reshape(-1).to(torch.int32).contiguous())
                if cfg.block_size_m not in routes:
                    al = moe_align_block_size(ti, cfg.block_size_m, E)
                    routes[cfg.block_size_m] = dict(sorted_token_ids=al.sorted_token_ids,
                                                    block_expert_ids=al.block_expert_ids,
                                                    num_tokens_post_padded=al.num_tokens_post_padded)
                return routes[cfg.block_size_m]

            out = torch.empty(pairs, w.n, dtype=dtype, device=device)
            buf = torch.empty(8 * pairs * w.n, dtype=torch.float32, device=device)

            def run(cfg):
                invoke_int4_moe_gemm(a, w, out, top_k_in=top_k_in, config=cfg, split_buffer=buf,
                                     may_drop_pairs=False, **route_for(cfg))
                return out

            ref = run(base).float().clone()
            t_base = timed(lambda: run(base))
            best_t, best, t_var = t_base, base, {}

            def with_tiles(cand: dict) -> Int4TileConfig:  # cand: JSON keys over the heuristic's (of its kernel)
                return Int4TileConfig.from_json(cand, source="sweep candidate",
                                                base=gemv_base if cand.get("GEMV") else dot_base)

            def try_config(cand: dict) -> Optional[float]:
                if cand.get("GEMV") and "BLOCK_SIZE_M" in cand and unsorted:
                    return None  # a multi-row candidate: sorted launches only
                cfg = with_tiles(cand)
                if cfg.block_size_k > max(16, w.k) or cfg.block_size_n > max(16, w.n):
                    return None
                try:
                    err = lb.norm_err(run(cfg), ref)
                except Exception as exc:  # e.g. out of shared memory
                    print(f"    skip {cand}: {type(exc).__name__}", flush=True)
                    return None
                if err > lb.TOLERANCE[dtype]:
                    sys.exit(f"CORRECTNESS FAILED: {case.name} {M} tokens {name} config {cfg}: error {err:.2e}")
                return timed(lambda: run(cfg))

            if unsorted:
                grid = [*candidates, *g_candidates]
            elif base.gemv:  # sorted: only the heuristic's kernel can be tuned (one alignment for both GEMMs)
                grid = list(gemv_rows_candidates(base.block_size_m)) if device.type == "cuda" else []
            else:
                grid = candidates
            if getattr(args, "sweep_variants_only", False):
                grid = []
            def fit(cand: dict) -> dict:  # a variant's wider tiles fall back to the heuristic's on a narrower GEMM
                return {k: v for k, v in cand.items()
                        if not (k == "BLOCK_SIZE_N" and v > max(16, w.n) or k == "BLOCK_SIZE_K" and v > max(16, w.k))}

            for vname, cand in [*((n, fit(v)) for n, v in variants.items()), *((None, c) for c in grid)]:
                t = try_config(cand)
                if vname is not None:
                    t_var[vname] = t
                cfg = with_tiles(cand)
                keeps = unsorted or (cfg.gemv == base.gemv and cfg.block_size_m == base.block_size_m)
                if t is not None and t < best_t and keeps:  # sorted: one alignment for both GEMMs
                    best_t, best = t, cfg
            key = ("int4_moe_gemm", E, w.n, w.k, w.group_size, int(not unsorted))
            tuned.setdefault(key, {})[str(pairs)] = best.to_json()
            var_cols = "".join(f" {t:.1f} |" if t is not None else " - |" for t in t_var.values())
            lines.append(f"| {case.name} | {M} | {name} | {'sorted' if not unsorted else 'unsorted'} | {t_base:.1f} "
                         f"|{var_cols} {best_t:.1f} | {t_base / best_t:.2f} | `{best.to_json()}` |")
            print(lines[-1], flush=True)
    return lines


def write_tuned(tuned: dict, folder: str) -> None:
    import json

    from vllm.kernel_configs import config_file_name
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import _device_name

    os.makedirs(folder, exist_ok=True)
    for (op, E, N, K, G, srt), table in tuned.items():
        path = os.path.join(folder, config_file_name(op, {"E": E, "N": N, "K": K, "G": G, "sorted": srt},
                                                     _device_name()))
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        print(f"wrote {path}")
