"""The dense projections of a decode step: cuBLAS (``F.linear``) vs the Triton GEMV (``ops/dense_gemv.py``).

What is timed: one projection, ``F.linear(x, W, b)`` and ``dense_gemv(x, W, b)`` at the heuristic's tiles, for
the q/k/v, o and router projections of Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b (biased) and the Qwen3 LM
head, at 1-8 tokens; CUDA-graph replay, L2 flushed before each replay, median of ``--reps`` (the timing helpers
of ``bench_timing.py``).  "other reduction": the GEMV with its other kernel at the same tiles (``delayed``:
each token's partial products reduced once at the end instead of every K-step; at most 4 tokens).
``--sweep``: also a grid of GEMV tiles (BLOCK_N, BLOCK_K, warps), the fastest named.

Correctness first: every GEMV output (heuristic and swept tiles) is compared with a float64 product and with
``F.linear`` before it is timed (normalised max error within the dtype's tolerance), and a row's output must be
the same bits whether it runs alone or in the batch.

Bytes: W (+ bias, x, y); "% of roofline" = (bytes / copy bandwidth) / time, the copy bandwidth measured here.

    PYTHONPATH=. python benchmarks/kernels/benchmark_dense_gemv.py [--shapes qwen3 mixtral gpt-oss]
        [--tokens 1 2 4 8] [--sweep] [--reps 100] [--out table.md]
    --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (exercises the code path only).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.bench_timing import add_run_args, emit, norm_err, pick_device, run_setup  # noqa: E402

# shape -> [(projection, N, K, bias)]
SHAPES = {
    "qwen3": [("qkv", 5120, 2048, False), ("o", 2048, 4096, False), ("router", 128, 2048, False),
              ("lm_head", 151936, 2048, False)],
    "mixtral": [("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("router", 8, 4096, False)],
    "gpt-oss": [("qkv", 5120, 2880, True), ("o", 2880, 4096, True), ("router", 32, 2880, True)],
}
NAMES = {"qwen3": "Qwen3-30B-A3B", "mixtral": "Mixtral-8x7B", "gpt-oss": "gpt-oss-20b", "smoke": "smoke"}
SMOKE = {"smoke": [("qkv", 48, 64, True), ("router", 8, 96, False)]}
SWEEP_N, SWEEP_K, SWEEP_WARPS = (4, 8, 16, 32), (256, 512, 1024), (4, 8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--sweep", action="store_true", help="also time a grid of GEMV tiles")
    add_run_args(p, smoke="tiny shapes", out="also write the table (markdown) here")
    return p.parse_args()


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b, dtype: torch.dtype, what: str) -> None:
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    err, err_lib = norm_err(y, ref), norm_err(y, F.linear(x, w, b).double())
    if err > tol or err_lib > tol:
        raise SystemExit(f"{what}: GEMV output off (vs float64 {err:.2e}, vs F.linear {err_lib:.2e}, tol {tol})")


def _best_tiles(x: torch.Tensor, w: torch.Tensor, b, dtype: torch.dtype, what: str, timed) -> str:
    """The fastest GEMV tiles of the sweep grid (each checked first), as "us (tiles)"."""
    from vllm.model_executor.layers.ops.dense_gemv import DenseGemvConfig, dense_gemv

    K = w.shape[1]
    k_cap = max(16, 1 << (K - 1).bit_length())  # K-steps no wider than K's power of two
    grid = sorted({DenseGemvConfig(bn, min(bk, k_cap), nw) for bn, bk, nw in itertools.product(SWEEP_N, SWEEP_K,
                                                                                               SWEEP_WARPS)},
                  key=lambda c: (c.block_n, c.block_k, c.num_warps))
    times = []
    for c in grid:
        _check(dense_gemv(x, w, b, config=c), x, w, b, dtype, f"{what} {c}")
        times.append((timed(lambda c=c: dense_gemv(x, w, b, config=c)), c))
    t, c = min(times, key=lambda tc: tc[0])
    return f"{t:.1f} (BLOCK_N {c.block_n}, BLOCK_K {c.block_k}, {c.num_warps} warps)"


def main() -> None:
    args = parse_args()
    device = pick_device(args.smoke)
    from vllm.model_executor.layers.ops.dense_gemv import (DELAYED_MAX_BLOCK_M, dense_gemv,
                                                           dense_gemv_config)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if device.type == "cpu":
        dtype = torch.float16  # the interpreter's bf16 is slow and its products are not the point here
    shapes = SMOKE if args.smoke else {k: SHAPES[k] for k in args.shapes}
    run = run_setup(args, device)
    timed, reps, bw, gpu = run.timed, run.reps, run.bandwidth, run.gpu

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for key, projs in shapes.items():
        for proj, N, K, has_bias in projs:
            w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
            b = (torch.randn(N, generator=gen) * 0.1).to(device=device, dtype=dtype) if has_bias else None
            for M in args.tokens:
                x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
                what = f"{NAMES[key]} {proj} {M} tokens"
                y = dense_gemv(x, w, b)
                _check(y, x, w, b, dtype, what)
                if not torch.equal(dense_gemv(x[-1:], w, b), y[-1:]):
                    raise SystemExit(f"{what}: the last row differs when it runs alone")
                nbytes = (w.numel() + (N if has_bias else 0) + M * (K + N)) * w.element_size()
                t_lib, t_gemv = timed(lambda: F.linear(x, w, b)), timed(lambda: dense_gemv(x, w, b))
                cfg = dense_gemv_config(N, K, dtype)
                delayed = "-"
                if M <= DELAYED_MAX_BLOCK_M:  # the kernel that reduces each token's partials once (untimed)
                    dcfg = dataclasses.replace(cfg, delayed=not cfg.delayed)
                    _check(dense_gemv(x, w, b, config=dcfg), x, w, b, dtype, f"{what} delayed={dcfg.delayed}")
                    delayed = f"{timed(lambda: dense_gemv(x, w, b, config=dcfg)):.1f}"
                best = _best_tiles(x, w, b, dtype, what, timed) if args.sweep else "-"
                roof = nbytes / bw * 1e6
                shape = f"{N} x {K}{' + bias' if has_bias else ''}"
                rows.append(f"| {NAMES[key]} | {proj} | {shape} | {M} | {t_lib:.1f} | {t_gemv:.1f} | "
                            f"{t_lib / t_gemv:.2f} | {nbytes / t_gemv / 1e3:.0f} | {roof / t_gemv:.0%} | "
                            f"{cfg.block_n} x {cfg.block_k}, {cfg.num_warps} warps | {delayed} | {best} | {gpu} |")
                print(rows[-1], flush=True)
    head = (f"{gpu}, {dtype}; copy bandwidth {bw / 1e12:.2f} TB/s; CUDA-graph replay, L2 flushed, "
            f"median of {reps}\n\n"
            "| shape | projection | N x K | tokens | F.linear (us) | GEMV (us) | F.linear / GEMV | GEMV GB/s | "
            "GEMV % of roofline | GEMV tiles (N x K) | other reduction (us) | best swept (us, tiles) | GPU |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|\n")
    emit(head + "\n".join(rows) + "\n\nCorrectness: every GEMV output within tolerance of float64 and F.linear; "
         "a row alone gives the same bits as in its batch\n", args.out)


if __name__ == "__main__":
    main()
