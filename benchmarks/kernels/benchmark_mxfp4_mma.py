"""The tensor-core MXFP4 GEMM (``csrc/capi/mxfp4_mma_moe.cu``) against the Triton MXFP4 kernels, one GEMM at a time.

Per shape (gpt-oss-20b, gpt-oss-120b), token count and GEMM (w13: [2I, H], w2: [H, I]; random codes, scales
2^-9..2^-7, biases, bf16 activations, random routing): the Triton heuristic's kernel (what
``UnfusedOAITritonExperts`` ran before: the GEMV at decode, the dot kernel beyond) and the tensor-core kernel with
its default stage / split and the best of a sweep (split-K 1-8, stages 64 / 128 / 256 where they tile K).  The
alignment is outside the timed region (the layer runs it once for both GEMMs).  Every output is checked first
against the fp32 reference on the checkpoint's blocks (``mxfp4_moe_gemm_torch``).

Times: CUDA-graph replay with the L2 flushed, median of ``--reps``.  Bytes: codes, scales and biases of the
experts the routing touches; "% copy" = those bytes / time against the measured device copy rate.

    python benchmarks/kernels/benchmark_mxfp4_mma.py [--shapes 20b 120b] [--tokens 1 4 16 64 256] [--out t.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels import bench_timing as bt  # noqa: E402

SHAPES = {"20b": ("gpt-oss-20b", 32, 2880, 2880, 4), "120b": ("gpt-oss-120b", 128, 2880, 2880, 4)}
TOLERANCE = 2e-2  # bf16, normalised max error against the fp32 reference


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--no-sweep", action="store_true", help="only the default stage and split")
    bt.add_run_args(p, smoke="not available: the kernel is CUDA only")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the tensor-core MXFP4 kernel is CUDA only")
    from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import mma_block_m
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import (
        STAGE_KS,
        Mxfp4MmaWeight,
        invoke_mxfp4_mma_moe_gemm,
        mx_launch_shape,
    )
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import (
        get_mxfp4_moe_config,
        invoke_mxfp4_moe_gemm,
        mxfp4_moe_gemm_torch,
    )
    from vllm.platforms import cuda_lib

    if cuda_lib.library() is None:
        sys.exit("the CUDA C++ kernels could not be built here (see the log)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    reps = args.reps or 100
    flush = torch.empty(bt.FLUSH_BYTES, dtype=torch.uint8, device=device)
    peak = bt.peak_bandwidth(device)
    gpu = torch.cuda.get_device_name()
    rows = []
    for key in args.shapes:
        name, E, H, I, top_k = SHAPES[key]
        gen = torch.Generator(device=device).manual_seed(E)
        weights = {}
        for gname, (N, K) in (("w13", (2 * I, H)), ("w2", (H, I))):
            blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device, generator=gen)
            scales = torch.randint(118, 121, (E, N, K // 32), dtype=torch.uint8, device=device, generator=gen)
            bias = (torch.randn(E, N, device=device, generator=gen) * 0.1).to(dtype)
            weights[gname] = (blocks, scales, bias, Mxfp4MmaWeight.from_blocks(blocks, scales))
        for M in args.tokens:
            ids = torch.rand(M, E, device=device, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)
            pairs = M * top_k
            touched = int(torch.unique(ids).numel())
            bm = mma_block_m(pairs, E, False) or 64
            al_mma = align_for_experts(ids, bm, E)
            for gname, (blocks, scales, bias, mw) in weights.items():
                N, K = mw.n, mw.k
                a = torch.randn(M if gname == "w13" else pairs, K, device=device, generator=gen).to(dtype)
                top_k_in = top_k if gname == "w13" else 1
                ref = torch.empty(pairs, N, dtype=torch.float32, device=device)
                mxfp4_moe_gemm_torch(ref, a.float(), blocks, scales, ids, top_k_in=top_k_in, bias=bias)
                out = torch.empty(pairs, N, dtype=dtype, device=device)
                buf = torch.empty(16 * pairs * N, dtype=torch.float32, device=device)
                cfg = get_mxfp4_moe_config(pairs, E, N, K, top_k, dtype)
                al = align_for_experts(ids, cfg.block_size_m, E)
                route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                             num_tokens_post_padded=al.num_tokens_post_padded)
                m_route = dict(sorted_token_ids=al_mma.sorted_token_ids, block_expert_ids=al_mma.block_expert_ids,
                               num_tokens_post_padded=al_mma.num_tokens_post_padded)

                def triton_run():
                    invoke_mxfp4_moe_gemm(a, blocks, scales, out, top_k_in=top_k_in, bias=bias, config=cfg,
                                          split_buffer=buf, **route)
                    return out

                def mma_run(split=None, stage=None):
                    invoke_mxfp4_mma_moe_gemm(a, mw, out, top_k_in=top_k_in, block_m=bm, bias=bias, split_k=split,
                                              stage=stage, split_buffer=buf, may_drop_pairs=False, **m_route)
                    return out

                for label, fn in (("triton", triton_run), ("mma", mma_run)):
                    err = bt.norm_err(fn(), ref)
                    if err > TOLERANCE:
                        sys.exit(f"CORRECTNESS FAILED: {name} {M} tokens {gname} {label}: error {err:.2e}")
                t_tri = bt.time_cuda(triton_run, flush, reps, True)[0]
                t_def = bt.time_cuda(mma_run, flush, reps, True)[0]
                d_stage, d_split = mx_launch_shape(min(pairs, E), N, K, bm)
                best, best_cfg = t_def, f"split {d_split}, stage {d_stage} (default)"
                if not args.no_sweep:
                    for stage in STAGE_KS:
                        if K % stage or (bm > 16 and stage == 256):
                            continue
                        for split in (1, 2, 3, 4, 8):
                            if split > K // stage or (split, stage) == (d_split, d_stage):
                                continue
                            fn = lambda s=split, st=stage: mma_run(s, st)  # noqa: E731
                            if bt.norm_err(fn(), ref) > TOLERANCE:
                                sys.exit(f"CORRECTNESS FAILED: {name} {M} {gname} mma split {split} stage {stage}")
                            t = bt.time_cuda(fn, flush, reps, True)[0]
                            if t < best:
                                best, best_cfg = t, f"split {split}, stage {stage}"
                nbytes = touched * (blocks[0].numel() + scales[0].numel() + bias[0].numel() * 2)
                rows.append(f"| {name} | {M} | {gname} | {touched} | {bm} | {t_tri:.1f} | {t_def:.1f} | {best:.1f} "
                            f"| {t_tri / best:.2f} | {nbytes / best / 1e3:.0f} | "
                            f"{100 * nbytes / (best * 1e-6) / peak:.0f} % | {best_cfg} |")
                print(rows[-1], flush=True)
    head = (f"MXFP4 GEMMs (+ bias), bf16, {gpu}, copy rate {peak / 1e12:.2f} TB/s; us (CUDA graphs, L2 flushed, "
            f"median of {reps})\n\n| shape | tokens | GEMM | experts touched | mma rows per block | Triton (heuristic) "
            "| mma (default) | mma (best) | Triton / mma | GB/s (best) | % copy | best config |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    bt.emit(head + "\n".join(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
