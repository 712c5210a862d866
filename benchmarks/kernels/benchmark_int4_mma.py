"""The tensor-core int4 GEMM (``csrc/capi/int4_mma_moe.cu``) against the Triton int4 kernels, one GEMM at a time.

Per shape (Qwen3-30B-A3B, Mixtral-8x7B), token count and GEMM (w13: [2I, H], w2: [H, I]; int4 group 128 with
zero points, bf16 activations, random routing): the Triton heuristic's kernel (what ``MarlinExperts`` runs
today: the GEMV at one token, the multi-row GEMV or the dot kernel beyond) and the tensor-core kernel with
its default split and the best of a small sweep (split-K 1-16, stage 128 / 256).  The alignment both
sorted launches need is outside the timed region (the layer runs it once for both GEMMs).  Every output
is checked first against the fp32 reference on the dequantised weights (``int4_moe_gemm_reference``).

Times: CUDA-graph replay with the L2 flushed, median of ``--reps``.  Bytes: the int4 words, scales and
zero points of the experts the routing touches; "% copy" = those bytes / time against the measured
device copy rate.

    python benchmarks/kernels/benchmark_int4_mma.py [--shapes qwen3 mixtral] [--tokens 1 4 16 64] [--out t.md]
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

SHAPES = {"qwen3": ("Qwen3-30B-A3B", 128, 2048, 768, 8), "mixtral": ("Mixtral-8x7B", 8, 4096, 14336, 2)}
TOLERANCE = 2e-2  # bf16, normalised max error against the fp32 reference


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--no-sweep", action="store_true", help="only the default split")
    p.add_argument("--block-m", type=int, default=None, choices=[8, 16, 32, 64],
                   help="rows per block of the sorted launches (default: mma_block_m's choice)")
    bt.add_run_args(p, smoke="not available: the kernel is CUDA only")
    return p.parse_args()


def random_weight(E: int, N: int, K: int, group: int, device):
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight

    gen = torch.Generator(device=device).manual_seed(E * N + K)
    qweight = torch.randint(-2**31, 2**31 - 1, (E, K // 8, N), dtype=torch.int32, device=device, generator=gen)
    scales = ((torch.rand(E, K // group, N, device=device, generator=gen) + 0.5) / (4 * K**0.5)).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (E, K // group, N), dtype=torch.uint8, device=device, generator=gen)
    return Int4PackedWeight(qweight, scales, zeros, group)


def weight_bytes(w, touched: int) -> int:
    per_expert = sum(t[0].numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
    return touched * per_expert


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the tensor-core int4 kernel is CUDA only")
    from vllm.model_executor.layers.fused_moe.int4_weights import int4_moe_gemm_reference
    from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import (
        STAGE_KS,
        Int4MmaWeight,
        _stage_fits,
        invoke_int4_mma_moe_gemm,
        launch_shape,
        mma_block_m,
    )
    from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import (
        get_int4_moe_config,
        invoke_int4_moe_gemm,
        use_unsorted_int4_gemm,
    )
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size
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
        weights = {"w13": random_weight(E, 2 * I, H, args.group, device), "w2": random_weight(E, H, I, args.group,
                                                                                            device)}
        mma = {k: Int4MmaWeight.from_packed(w) for k, w in weights.items()}
        for M in args.tokens:
            gen = torch.Generator(device=device).manual_seed(M)
            ids = torch.rand(M, E, device=device, generator=gen).topk(top_k, dim=1).indices.to(torch.int32)
            pairs = M * top_k
            touched = int(torch.unique(ids).numel())
            unsorted = use_unsorted_int4_gemm(pairs, E)
            bm = args.block_m or mma_block_m(pairs, E, unsorted) or 64
            al_mma = None if unsorted else moe_align_block_size(ids, bm, E)
            for gname, w in weights.items():
                N, K = w.n, w.k
                a = torch.randn(M if gname == "w13" else pairs, K, device=device, generator=gen).to(dtype)
                top_k_in = top_k if gname == "w13" else 1
                ref = int4_moe_gemm_reference(a, w, ids, top_k_in=top_k_in)
                out = torch.empty(pairs, N, dtype=dtype, device=device)
                buf = torch.empty(16 * pairs * N, dtype=torch.float32, device=device)
                cfg = get_int4_moe_config(pairs, E, N, K, w.group_size, dtype, sorted_pairs=not unsorted)
                if unsorted:
                    t_route = dict(pair_expert_ids=ids.reshape(-1).contiguous())
                    m_route = t_route
                else:
                    al = moe_align_block_size(ids, cfg.block_size_m, E)
                    t_route = dict(sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                                   num_tokens_post_padded=al.num_tokens_post_padded)
                    m_route = dict(sorted_token_ids=al_mma.sorted_token_ids,
                                   block_expert_ids=al_mma.block_expert_ids,
                                   num_tokens_post_padded=al_mma.num_tokens_post_padded)

                def triton_run():
                    invoke_int4_moe_gemm(a, w, out, top_k_in=top_k_in, config=cfg, split_buffer=buf,
                                         may_drop_pairs=False, **t_route)
                    return out

                def mma_run(split=None, stage=None):
                    invoke_int4_mma_moe_gemm(a, mma[gname], out, top_k_in=top_k_in, block_m=8 if unsorted else bm,
                                             split_k=split, stage=stage, split_buffer=buf, may_drop_pairs=False,
                                             **m_route)
                    return out

                for label, fn in (("triton", triton_run), ("mma", mma_run)):
                    err = bt.norm_err(fn(), ref)
                    if err > TOLERANCE:
                        sys.exit(f"CORRECTNESS FAILED: {name} {M} tokens {gname} {label}: error {err:.2e}")
                t_tri = bt.time_cuda(triton_run, flush, reps, True)[0]
                t_def = bt.time_cuda(mma_run, flush, reps, True)[0]
                nb = pairs if unsorted else min(pairs, E)
                d_stage, d_split = launch_shape(nb, N, K, w.group_size, 8 if unsorted else bm)
                best, best_cfg = t_def, f"split {d_split}, stage {d_stage} (default)"
                if not args.no_sweep:
                    for stage in STAGE_KS:
                        if not _stage_fits(stage, K, w.group_size) or (bm > 16 and not unsorted and stage != 128):
                            continue
                        for split in (1, 2, 4, 8, 16):
                            if split > K // stage:
                                continue
                            fn = lambda s=split, st=stage: mma_run(s, st)  # noqa: E731
                            if bt.norm_err(fn(), ref) > TOLERANCE:
                                sys.exit(f"CORRECTNESS FAILED: {name} {M} {gname} mma split {split} stage {stage}")
                            t = bt.time_cuda(fn, flush, reps, True)[0]
                            if t < best:
                                best, best_cfg = t, f"split {split}, stage {stage}"
                nbytes = weight_bytes(w, touched)
                rows.append(f"| {name} | {M} | {gname} | {touched} | {'unsorted' if unsorted else f'sorted {bm}'} "
                            f"| {t_tri:.1f} | {t_def:.1f} | {best:.1f} | {t_tri / best:.2f} | "
                            f"{nbytes / best / 1e3:.0f} | {100 * nbytes / (best * 1e-6) / peak:.0f} % | {best_cfg} |")
                print(rows[-1], flush=True)
    head = (f"int4 g{args.group} GEMMs, bf16, {gpu}, copy rate {peak / 1e12:.2f} TB/s; us (CUDA graphs, L2 flushed, "
            f"median of {reps})\n\n| shape | tokens | GEMM | experts touched | mma routing | Triton (heuristic) | "
            "mma (default) | mma (best) | Triton / mma | GB/s (best) | % copy | best config |\n"
            "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n")
    bt.emit(head + "\n".join(rows) + "\n", args.out)


if __name__ == "__main__":
    main()
