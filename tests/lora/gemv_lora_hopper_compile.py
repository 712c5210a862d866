"""Compile the decode GEMV with the LoRA expand in its epilogue (``_gemv_lora_kernel.py``) for an H100/H200
(sm_90) without a GPU: run as a script, without TRITON_INTERPRET, by test_gemv_lora.py.  The GEMV's own tiles
at one token for the Qwen3-30B-A3B q/k/v (3 slices) and o projections, ranks 16 and 32, specialised as at run
time on contiguous tensors.  Prints one line per variant (registers, spills); exits 1 when one spills."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, resources, specialise  # noqa: E402
from vllm.lora.ops.triton_ops._gemv_lora_kernel import dense_gemv_lora_kernel  # noqa: E402
from vllm.model_executor.layers.ops.dense_gemv import dense_gemv_config  # noqa: E402


def compile_case(N: int, K: int, slices: int, R: int):
    cfg = dense_gemv_config(N, K, torch.bfloat16)
    ptrs = {"x_ptr": "bf16", "w_ptr": "bf16", "bias_ptr": "bf16", "y_ptr": "bf16", "part_ptr": "fp32",
            "b_ptr": "bf16", "map_ptr": "i32", "enabled_ptr": "i32"}
    cexp = dict(HAS_BIAS=False, EVEN_K=K % cfg.block_k == 0, BLOCK_M=1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                HAS_ENABLED=True, NUM_SLICES=slices, BLOCK_R=R, BLOCK_J=4, USE_PDL=True)
    widths = [N] if slices == 1 else [N - 1024, 512, 512]
    offs = [sum(widths[:s]) for s in range(slices)]
    widths, offs = widths + [0] * (3 - slices), offs + [0] * (3 - slices)
    ints = dict(M=1, N=N, K=K, stride_xm=K, stride_wn=K, stride_ym=N, R=R, max_loras=4, k_splits=4,
                n0=widths[0], n1=widths[1], n2=widths[2], off0=offs[0], off1=offs[1], off2=offs[2],
                stride_pt=slices * 4 * R, stride_ps=4 * R, stride_pj=R, stride_bs=4 * max(widths) * R,
                stride_bl=max(widths) * R, stride_bn=R, stride_br=1)
    src = specialise(dense_gemv_lora_kernel, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options=dict(num_warps=cfg.num_warps))


def main() -> int:
    bad = 0
    for name, (N, K, slices) in {"qkv": (5120, 2048, 3), "o": (2048, 4096, 1)}.items():
        for R in (16, 32):
            regs, spills = resources(compile_case(N, K, slices, R).asm["cubin"])
            ok = spills == 0
            bad += not ok
            print(f"{'ok' if ok else 'FAILED'} {name} rank {R}: {regs} registers, {spills} B local", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
