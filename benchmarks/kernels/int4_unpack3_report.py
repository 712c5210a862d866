"""Static report (sm_90, no GPU) of the int4 tl.dot kernel at 4-64 rows per expert, UNPACK 0 against UNPACK 3,
every num_stages 2-4: per shape, token count, GEMM and dtype, the heuristic's dot tiles (``gemv=False``),
shared memory (against the H100 / H200 limit and ``int4_dot_smem``'s bound), registers, spills and the main
loop's instructions per weight.  Run without TRITON_INTERPRET:

    PYTHONPATH=. python benchmarks/kernels/int4_unpack3_report.py [--cases qwen3:64 mixtral:16 mixtral:64]
        [--dtypes bf16 fp16] [--stages 2 3 4] [--out table.md]
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter replaces the compiler)")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from benchmarks.kernels.benchmark_moe_lora import SHAPES  # noqa: E402
from benchmarks.kernels.kernel_static_report import compile_int4  # noqa: E402
from benchmarks.kernels.sass_stats import main_loop_stats, resources  # noqa: E402

HEADER = ("| shape | tokens | GEMM | dtype | tiles | UNPACK | stages | shared (B) | bound (B) | fits 232448 "
          "| regs | spill (B) | instr. / weight | pipelined |\n"
          "|---|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|")


def rows(cases: list[str], dtypes: list[str], stages_list: list[int], group: int = 128):
    from vllm.model_executor.layers.fused_moe.ops.int4_dot_smem import SM90_SHARED_LIMIT, unpack3_shared_bytes
    from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, use_unsorted_int4_gemm

    for case in cases:
        key, M = case.split(":")
        name, H, I, E, k = SHAPES[key]
        pairs = int(M) * k
        srt = not use_unsorted_int4_gemm(pairs, E)
        for gemm, N, K in (("w13", 2 * I, H), ("w2", H, I)):
            for dt in dtypes:
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
                base = get_int4_moe_config(pairs, E, N, K, group, dtype, sorted_pairs=srt, gemv=False)
                for unpack in (0, 3):
                    for stages in stages_list:
                        cfg = dict(base.to_json(), UNPACK=unpack, num_stages=stages)
                        kern = compile_int4(dtype, cfg, N=N, K=K, num_pairs=pairs, sorted_pairs=srt, group=group)
                        regs, spill = resources(kern.asm["cubin"])
                        lp = main_loop_stats(kern, base.block_size_k * base.block_size_n, base.num_warps)
                        tiles = (f"{base.block_size_m}x{base.block_size_n}x{base.block_size_k} w{base.num_warps} "
                                 f"split {base.split_k}")
                        bound = (unpack3_shared_bytes(base.block_size_m, base.block_size_n, base.block_size_k, stages)
                                 if unpack == 3 else "-")
                        shared = kern.metadata.shared
                        yield (f"| {name} | {M} | {gemm} | {dt} | {tiles} | {unpack} | {stages} | {shared} | {bound} "
                               f"| {'yes' if shared <= SM90_SHARED_LIMIT else 'NO'} | {regs} | {spill} "
                               f"| {lp.per_weight:.2f} | {'yes' if lp.pipelined else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["qwen3:64", "mixtral:16", "mixtral:64"],
                   help="SHAPE:TOKENS (shapes of benchmark_moe_lora.SHAPES)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args()
    print(HEADER, flush=True)
    lines = []
    for line in rows(args.cases, args.dtypes, args.stages):
        print(line, flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(HEADER + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
