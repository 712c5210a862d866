"""The dequant path's weight expansion: 4-bit expert words -> dense bf16, per tile shape.

Times ``w4_mma_dequant.dequantize_mma_words`` (from the tensor-core words, the copy kept on CUDA; per decode
order, tile and warp count) and, for
int4, ``int4_dequant.dequantize_int4_experts`` (from the Triton layout) on one chunk of experts of a real
layer's shape, after checking each variant bit for bit against the torch unpacking of one expert.  Prints
a table: shape, variant, time, GB/s (4-bit words + scales read, bf16 written), % of a device copy's rate,
GPU name.

    python benchmarks/kernels/benchmark_w4_dequant.py [--reps 20] [--tiles 32x256 64x128 ...] [--orders element words]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernels.bench_timing import FLUSH_BYTES, peak_bandwidth, time_cuda  # noqa: E402

GROUP = 128  # int4 inputs per scale
SHAPES = {  # name: (format, experts in the chunk, N, K)
    "mixtral-w13-int4": ("int4", 4, 28672, 4096),
    "qwen3-w13-int4": ("int4", 32, 1536, 2048),
    "gpt-oss-20b-w13-mxfp4": ("mxfp4", 8, 5760, 2880),
}


def _case(fmt: str, E: int, N: int, K: int, gen: torch.Generator):
    from vllm.model_executor.layers.fused_moe.int4_weights import Int4PackedWeight, pack_int4_k
    from vllm.model_executor.layers.fused_moe.ops.int4_mma_moe import Int4MmaWeight
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import Mxfp4MmaWeight

    if fmt == "int4":
        q = torch.randint(0, 16, (E, N, K), dtype=torch.uint8, generator=gen).cuda()
        g = GROUP
        pw = Int4PackedWeight(pack_int4_k(q).transpose(1, 2).contiguous(),
                              torch.rand(E, K // g, N, generator=gen).bfloat16().cuda(),
                              torch.randint(0, 16, (E, K // g, N), dtype=torch.uint8, generator=gen).cuda(), g)
        return Int4MmaWeight.from_packed(pw), pw, E * N * K // 2 + 3 * E * (K // g) * N
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 135, (E, N, K // 32), dtype=torch.uint8, generator=gen)
    return Mxfp4MmaWeight.from_blocks(blocks.cuda(), scales.cuda()), None, E * N * K // 2 + E * N * K // 32


def main() -> None:
    from vllm.model_executor.layers.fused_moe.ops.int4_dequant import dequantize_int4_experts
    from vllm.model_executor.layers.fused_moe.ops.w4_mma_dequant import dequantize_mma_words

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tiles", nargs="*", default=["32x256", "16x256", "64x128", "32x512", "64x256"])
    p.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    p.add_argument("--orders", nargs="*", default=["element", "words"], choices=["element", "words"],
                   help="the kernel's decode order (w4_mma_dequant.dequantize_mma_words' order)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gpu, peak = torch.cuda.get_device_name(), peak_bandwidth(torch.device("cuda")) / 1e9
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    print(f"## 4-bit expert dequantisation to bf16: {gpu}, copy peak {peak:.0f} GB/s\n")
    print("| shape | experts x N x K | variant | us | GB/s | % of copy peak | GPU |\n|---|---|---|---:|---:|---:|---|")
    for name in args.shapes:
        fmt, E, N, K = SHAPES[name]
        mw, pw, read = _case(fmt, E, N, K, gen)
        out = torch.empty(E, N, K, dtype=torch.bfloat16, device="cuda")
        want = mw.dequantize(torch.empty(1, N, K, dtype=torch.bfloat16, device="cuda"), E - 1, E, use_triton=False)
        bytes_moved = read + out.numel() * 2
        variants = {}
        mx = fmt == "mxfp4"
        zeros, scales = (None, mw.scales_t) if mx else (pw.zeros, pw.scales)
        for order in args.orders:
            for tile in args.tiles:
                bn, bk = (int(x) for x in tile.split("x"))
                for w in args.warps:
                    variants[f"mma words, {order} order, {tile} w{w}"] = (
                        lambda bn=bn, bk=bk, w=w, order=order: dequantize_mma_words(
                            mw.words, scales, out, 0, E, mxfp4=mx, zeros=zeros, group_size=GROUP, block_n=bn,
                            block_k=bk, num_warps=w, order=order))
        if pw is not None:
            variants["Triton layout 64x128 w4 (int4_dequant)"] = lambda: dequantize_int4_experts(pw, out, 0, E)
        for label, fn in variants.items():
            out.fill_(float("nan"))
            fn()
            if not torch.equal(out[-1:].view(torch.int16), want.view(torch.int16)):
                print(f"| {name} | {E} x {N} x {K} | {label} | WRONG | | | {gpu} |")
                continue
            us = time_cuda(lambda: (fn(), out)[1], flush, args.reps, use_graph=False)[0]
            gbs = bytes_moved / us / 1e3
            print(f"| {name} | {E} x {N} x {K} | {label} | {us:.1f} | {gbs:.0f} | {100 * gbs / peak:.0f} % | {gpu} |")


if __name__ == "__main__":
    main()
