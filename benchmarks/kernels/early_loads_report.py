"""The loads before the PDL wait, statically (sm_90, no GPU needed): for each kernel that can load step-invariant
data before ``griddepcontrol.wait`` - q/k norm + rotary and the split decode attention and its reduce
(``vllm/platforms/pdl.EARLY_LOADS``) - the dependent global round trips left after the wait (``sass_round_trips.
round_trips_after_wait``) and the loads issued before it, without and with the switch, at Qwen3-30B-A3B's widths.

    PYTHONPATH=. python benchmarks/kernels/early_loads_report.py [--out table.md]

The kernel specialisations here are also what the sm_90 compile tests build (``tests/kernels/
pdl_early_loads_compile.py``, ``tests/lora/lora_linear_sorted_split_hopper_compile.py``) and what
``handoff_static_report.py`` compares against (the dense LoRA prefetch kernel).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.bench_timing import emit  # noqa: E402
from benchmarks.kernels.sass_round_trips import round_trips_after_wait  # noqa: E402
from benchmarks.kernels.sass_stats import TARGET, _sass, resources, specialise  # noqa: E402
from vllm.attention._decode_split_kernel import decode_reduce_kernel, decode_split_kernel  # noqa: E402
from vllm.lora.ops.triton_ops import _lora_linear_sorted_split_kernels as split_kern  # noqa: E402
from vllm.lora.ops.triton_ops._lora_linear_kernels import lora_linear_token_prefetch_kernel  # noqa: E402
from vllm.lora.ops.triton_ops.lora_linear_sorted_split import sorted_split_config  # noqa: E402
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block  # noqa: E402
from vllm.model_executor.layers.ops._qk_norm_rope_kernel import _qk_norm_rope_kernel  # noqa: E402
from vllm.triton_utils import next_power_of_2  # noqa: E402

# name -> (kernel, pointer dtypes, constexprs, ints, warps): Qwen3-30B-A3B's attention (32 query / 4 KV heads of
# 128, block size 16, 16 splits); the switch is the constexpr EARLY
ATTENTION_CASES: dict[str, tuple[Any, dict, dict, dict, int]] = {
    "qk_norm_rope": (_qk_norm_rope_kernel,
                     {**{n: "bf16" for n in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qw_ptr", "kw_ptr")},
                      "pos_ptr": "i64", "cos_ptr": "fp32", "sin_ptr": "fp32"},
                     {"NORM": 1, "CLIP": False, "HAS_PASS": False, "NH_P": 32, "HALF_P": 64, "PASS_P": 1},
                     {"NQ": 0, "NK": 0, "HEAD_DIM": 128, "HALF": 64, "MAX_POS": 0, "stride_q": 5120,
                      "stride_k": 5120, "stride_qo": 4096, "stride_ko": 512, "stride_cos": 64, "n_tokens": 0}, 8),
    "decode_split": (decode_split_kernel,
                     {"q_ptr": "bf16", "kv_ptr": "bf16", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32",
                      "block_tables_ptr": "i32", "part_acc_ptr": "fp32", "part_m_ptr": "fp32", "part_l_ptr": "fp32"},
                     {"NUM_SPLITS": 16, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_D": 128, "UPCAST": False,
                      "USE_WINDOW": False},
                     {"GROUP": 8, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "NUM_HEADS": 32, "WINDOW": 0, "stride_qt": 4096,
                      "stride_qh": 128, "stride_qd": 1, "stride_kv": 0, "stride_kb": 8192, "stride_ko": 512,
                      "stride_kh": 128, "stride_kd": 1, "stride_bt_b": 64}, 4),
    "decode_reduce": (decode_reduce_kernel,
                      {"out_ptr": "bf16", "query_start_loc_ptr": "i32", "seq_lens_ptr": "i32", "part_acc_ptr": "fp32",
                       "part_m_ptr": "fp32", "part_l_ptr": "fp32", "sinks_ptr": "bf16"},
                      {"NUM_SPLITS": 16, "SPLITS_P": 16, "BLOCK_N": 32, "BLOCK_D": 128, "USE_WINDOW": False,
                       "USE_SINKS": True},
                      {"HEAD_DIM": 128, "NUM_HEADS": 32, "WINDOW": 0, "stride_ot": 4096, "stride_oh": 128,
                       "stride_od": 1}, 1),
}

# the dense LoRA prefetch kernel at the q/k/v launch (rank 16, one token, 4 slots)
LORA_PREFETCH_PTRS = {"x_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "y_ptr": "bf16", "mapping_ptr": "i32",
                      "enabled_ptr": "i32"}
LORA_PREFETCH_INTS = {"K": 2048, "R": 16, "max_loras": 4, "n0": 4096, "n1": 512, "n2": 512, "off0": 0, "off1": 4096,
                      "off2": 4608, "stride_xt": 2048, "stride_xk": 1, "stride_as": 131072, "stride_al": 32768,
                      "stride_ar": 2048, "stride_ak": 1, "stride_bs": 262144, "stride_bl": 65536, "stride_bn": 16,
                      "stride_br": 1, "stride_yt": 5120, "stride_yn": 1}


def compile_attention(name: str, early: bool):
    fn, ptrs, cexp, ints, warps = ATTENTION_CASES[name]
    src = specialise(fn, ptrs, {**cexp, "USE_PDL": True, "EARLY": early}, ints)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "launch_pdl": True})


def compile_lora_prefetch():
    cexp = {"HAS_ENABLED": True, "BLOCK_N": 128, "BLOCK_K": 2048, "BLOCK_R": 16, "K_TILES": 1, "USE_PDL": True}
    src = specialise(lora_linear_token_prefetch_kernel, LORA_PREFETCH_PTRS, cexp, LORA_PREFETCH_INTS)
    return triton.compile(src, target=TARGET, options={"num_warps": 16, "launch_pdl": True})


def compile_sorted_pair(T: int, K: int, widths: list[int], R: int, L: int = 4):
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


def loads_before_wait(compiled) -> int:
    ptx = compiled.asm["ptx"]
    return ptx[:ptx.find("griddepcontrol.wait")].count("ld.global")


def rows() -> list[tuple[str, str, Optional[int], Optional[int], int, int]]:
    """(kernel, switch, trips after the wait off, on, loads before the wait on, spill bytes on)."""
    out = []

    def add(kernel: str, switch: str, off, on) -> None:
        sass_off, sass_on = _sass(off.asm["cubin"]) or "", _sass(on.asm["cubin"]) or ""
        out.append((kernel, switch, round_trips_after_wait(sass_off), round_trips_after_wait(sass_on),
                    loads_before_wait(on), resources(on.asm["cubin"])[1] or 0))

    for name in ATTENTION_CASES:
        add(name, "EARLY_LOADS", compile_attention(name, False), compile_attention(name, True))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lines = ["| kernel | switch | round trips after the wait, off | on | global loads before the wait, on | "
             "spills, on |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| `{k}` | `{s}` | {off} | {on} | {loads} | {spill} B |" for k, s, off, on, loads, spill in rows()]
    emit("\n".join(lines), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
