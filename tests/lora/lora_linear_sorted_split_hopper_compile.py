"""Compile the dense LoRA sorted path's split pair (``_lora_linear_sorted_split_kernels.py``) for an H100/H200
(sm_90) without a GPU: run as a script, without TRITON_INTERPRET, by test_lora_linear_sorted_split.py.  The
GPU tiles of ``sorted_split_config`` for the Qwen3-30B-A3B q/k/v (3 slices) and o launches at 64 and 256
tokens, ranks 16 and 32, specialised as at run time on contiguous tensors, with PDL (no global load or store
before ``griddepcontrol.wait``).  Prints one line per kernel and case (registers, spills, shared memory); exits
1 when one spills or fails that."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, pdl_compile_check, specialise  # noqa: E402
from vllm.lora.ops.triton_ops import _lora_linear_sorted_split_kernels as split_kern  # noqa: E402
from vllm.lora.ops.triton_ops.lora_linear_sorted_split import sorted_split_config  # noqa: E402
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block  # noqa: E402
from vllm.triton_utils import next_power_of_2  # noqa: E402


def compile_pair(T: int, K: int, widths: list[int], R: int, L: int = 4):
    """The sorted split pair (shrink, expand) as ``launch_sorted_split`` launches it on contiguous tensors, with
    PDL: ``sorted_split_config``'s GPU tiles for T tokens, K inputs, slices of ``widths``, rank R, L slots."""
    cfg = sorted_split_config(T, K, max(widths), R, torch.bfloat16)
    S, br, splits = len(widths), rank_block(R), -(-K // cfg.block_k)
    n = widths + [0] * (3 - S)
    offs = [sum(widths[:i]) for i in range(S)] + [0] * (3 - S)
    p_strides = dict(stride_pb=S * splits * cfg.block_m * br, stride_ps=splits * cfg.block_m * br,
                     stride_pj=cfg.block_m * br, stride_pm=br)
    common = dict(HAS_ENABLED=True, UPCAST=False, FP32_PRECISION="tf32x3", BLOCK_M=cfg.block_m, BLOCK_R=br,
                  USE_PDL=True)
    shrink = specialise(
        split_kern.lora_linear_sorted_shrink_kernel,
        dict(x_ptr="bf16", a_ptr="bf16", part_ptr="fp32", sorted_ids_ptr="i32", counts_ptr="i32", enabled_ptr="i32"),
        dict(common, BLOCK_K=cfg.block_k),
        dict(num_tokens=T, K=K, R=R, num_slots=L, stride_xt=K, stride_xk=1, stride_as=L * R * K if S > 1 else 0,
             stride_al=R * K, stride_ar=K, stride_ak=1, **p_strides))
    expand = specialise(
        split_kern.lora_linear_sorted_expand_kernel,
        dict(part_ptr="fp32", b_ptr="bf16", y_ptr="bf16", sorted_ids_ptr="i32", counts_ptr="i32", enabled_ptr="i32"),
        dict(common, EXPAND_MODE=1, BLOCK_N=cfg.block_n, BLOCK_J=next_power_of_2(splits)),
        dict(num_tokens=T, R=R, num_slots=L, k_splits=splits, n0=n[0], n1=n[1], n2=n[2], off0=offs[0],
             off1=offs[1], off2=offs[2], stride_bs=L * max(widths) * R if S > 1 else 0, stride_bl=max(widths) * R,
             stride_bn=R, stride_br=1, stride_yt=sum(widths), stride_yn=1, **p_strides))
    opts = dict(num_warps=cfg.num_warps, num_stages=1, launch_pdl=True)
    return triton.compile(shrink, target=TARGET, options=opts), triton.compile(expand, target=TARGET, options=opts)


def main() -> int:
    bad = 0
    for name, (K, widths) in {"qkv": (2048, [4096, 512, 512]), "o": (4096, [2048])}.items():
        for T in (64, 256):
            for R in (16, 32):
                for kname, k in zip(("shrink", "expand"), compile_pair(T, K, widths, R)):
                    ok, regs, spills = pdl_compile_check(k)
                    bad += not ok
                    print(f"{'ok' if ok else 'FAILED'} {kname} {name} {T} tokens rank {R}: {regs} registers, "
                          f"{spills} B local, shared {k.metadata.shared} B", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
