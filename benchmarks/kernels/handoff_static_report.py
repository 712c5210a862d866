"""The dense LoRA handoff's kernels, statically (sm_90, no GPU needed): what the fused ops around a projection cost
when they also carry its LoRA delta (``vllm/lora/layers/dense_handoff.py``), against the same ops without it and
against the LoRA launches the handoff removes - registers, spill bytes and the dependent global round trips after
the PDL wait (``sass_round_trips.round_trips_after_wait``), at Qwen3-30B-A3B's widths and rank 16.

    PYTHONPATH=. python benchmarks/kernels/handoff_static_report.py [--out table.md]

A launch in the decode step's chain costs roughly its round trips after the wait (each ~0.6-1 us on an H200) plus
the launch gap; the handoff moves the LoRA's round trips into kernels that run anyway.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.bench_timing import emit  # noqa: E402
from benchmarks.kernels.sass_round_trips import round_trips_after_wait  # noqa: E402
from benchmarks.kernels.sass_stats import TARGET, _sass, resources, specialise  # noqa: E402
from vllm.lora.ops.triton_ops._lora_linear_kernels import lora_linear_token_prefetch_kernel  # noqa: E402
from vllm.lora.ops.triton_ops._lora_linear_split_kernels import lora_linear_split_shrink_kernel  # noqa: E402
from vllm.model_executor.layers.ops._dense_gemv_kernel import dense_gemv_kernel  # noqa: E402
from vllm.model_executor.layers.ops._qk_norm_rope_kernel import _qk_norm_rope_kernel  # noqa: E402
from vllm.model_executor.layers.ops._rms_norm_kernel import _rms_norm_kernel  # noqa: E402

H, R, L = 2048, 16, 4  # hidden, rank, slots
NORM_PTRS = {n: "bf16" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")}
NORM_INTS = {"N": H, "stride_x": H, "stride_r": H, "stride_o": H, "stride_ro": H}
SHRINK = ({"sa_ptr": "bf16", "sp_ptr": "fp32", "smap_ptr": "i32"},
          {"SHRINK": True, "S_BLOCK_R": R, "S_BLOCK_K": 512},
          {"stride_sas": L * R * H, "stride_sal": R * H, "stride_sar": H, "stride_sak": 1, "stride_spt": 3 * 4 * R,
           "stride_sps": 4 * R, "stride_spj": R, "s_slices": 3, "s_splits": 4, "s_rank": R, "s_loras": L})


def _delta(n_max: int, splits: int) -> tuple[dict, dict, dict]:
    """The consumer's operands as ``PendingDelta.delta_kernel_args`` gives them."""
    return ({"dp_ptr": "fp32", "db_ptr": "bf16", "dmap_ptr": "i32"},
            {"DELTA": True, "D_BLOCK_J": splits, "D_BLOCK_R": R},
            {"stride_dpt": 3 * splits * R, "stride_dps": splits * R, "stride_dpj": R, "d_splits": splits,
             "stride_dbs": L * n_max * R, "stride_dbl": n_max * R, "stride_dbn": R, "stride_dbr": 1, "d_rank": R,
             "d_loras": L})


def compile_norm(extra: Optional[tuple[dict, dict, dict]]):
    ptrs, cexp, ints = extra or ({}, {}, {})
    src = specialise(_rms_norm_kernel, {**NORM_PTRS, **ptrs},
                     {"HAS_RESIDUAL": True, "BLOCK_N": H, "USE_PDL": True, **cexp}, {**NORM_INTS, **ints})
    return triton.compile(src, target=TARGET, options={"num_warps": 8, "launch_pdl": True})


def compile_qk(delta: bool, cexp_over: Optional[dict] = None, ints_over: Optional[dict] = None):
    """q/k norm + rotary at Qwen3-30B-A3B's heads (32 / 4 of 128, per-head norm), without or with the q/k/v delta;
    ``cexp_over`` / ``ints_over``: other specialisations (the compile test's)."""
    ptrs = {**{n: "bf16" for n in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qw_ptr", "kw_ptr")},
            "pos_ptr": "i64", "cos_ptr": "fp32", "sin_ptr": "fp32"}
    cexp: dict[str, Any] = {"NORM": 1, "CLIP": False, "HAS_PASS": False, "NH_P": 32, "HALF_P": 64, "PASS_P": 1,
                            "USE_PDL": True}
    ints = {"NQ": 0, "NK": 0, "HEAD_DIM": 128, "HALF": 64, "MAX_POS": 0, "stride_q": 5120, "stride_k": 5120,
            "stride_qo": 4096, "stride_ko": 512, "stride_cos": 64, "n_tokens": 0, "q_heads": 32}
    if delta:
        dp, dc, di = _delta(4096, 4)
        ptrs.update(dp, v_ptr="bf16")
        cexp.update(dc, NH_P=4, Q_GROUPS=8)
        ints.update(di, q_heads=4, stride_v=5120)
    cexp.update(cexp_over or {})
    ints.update(ints_over or {})
    if cexp.get("WRITE_KV"):
        ptrs.update(cache_ptr="bf16", slot_ptr="i64", v_ptr="bf16")
    src = specialise(_qk_norm_rope_kernel, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options={"num_warps": 4 if delta else 8, "launch_pdl": True})


def compile_gemv(shrink: bool):
    """The o projection's decode GEMV at one token (hidden 2048, K 4096), with its shrink programs or without."""
    ptrs = {"x_ptr": "bf16", "w_ptr": "bf16", "bias_ptr": "bf16", "y_ptr": "bf16"}
    cexp: dict[str, Any] = {"HAS_BIAS": False, "EVEN_K": True, "BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024,
                            "USE_PDL": True}
    ints = {"N": H, "K": 4096, "stride_xm": 4096, "stride_wn": 4096, "stride_ym": H, "n_tiles": H // 4}
    if shrink:
        ptrs.update(sa_ptr="bf16", sp_ptr="fp32", smap_ptr="i32")
        cexp.update(SHRINK=True, S_BLOCK_R=R, S_BLOCK_K=512)
        ints.update(stride_sas=0, stride_sal=R * 4096, stride_sar=4096, stride_sak=1, stride_spt=8 * R,
                    stride_sps=8 * R, stride_spj=R, s_slices=1, s_splits=8, s_rank=R, s_loras=L)
    src = specialise(dense_gemv_kernel, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options={"num_warps": 8, "launch_pdl": True})


def compile_o_shrink():
    src = specialise(lora_linear_split_shrink_kernel,
                     {"x_ptr": "bf16", "a_ptr": "bf16", "part_ptr": "fp32", "mapping_ptr": "i32"},
                     {"BLOCK_K": 512, "BLOCK_R": R, "USE_PDL": True},
                     {"K": 4096, "R": R, "max_loras": L, "stride_xt": 4096, "stride_xk": 1, "stride_as": 0,
                      "stride_al": R * 4096, "stride_ar": 4096, "stride_ak": 1, "stride_pt": 8 * R, "stride_ps": 8 * R,
                      "stride_pj": R})
    return triton.compile(src, target=TARGET, options={"num_warps": 8, "launch_pdl": True})


# the dense LoRA prefetch kernel at the q/k/v launch (rank 16, one token, 4 slots): what the handoff removes there
LORA_PREFETCH_PTRS = {"x_ptr": "bf16", "a_ptr": "bf16", "b_ptr": "bf16", "y_ptr": "bf16", "mapping_ptr": "i32",
                      "enabled_ptr": "i32"}
LORA_PREFETCH_INTS = {"K": 2048, "R": 16, "max_loras": 4, "n0": 4096, "n1": 512, "n2": 512, "off0": 0, "off1": 4096,
                      "off2": 4608, "stride_xt": 2048, "stride_xk": 1, "stride_as": 131072, "stride_al": 32768,
                      "stride_ar": 2048, "stride_ak": 1, "stride_bs": 262144, "stride_bl": 65536, "stride_bn": 16,
                      "stride_br": 1, "stride_yt": 5120, "stride_yn": 1}


def compile_lora_prefetch():
    cexp = {"HAS_ENABLED": True, "BLOCK_N": 128, "BLOCK_K": 2048, "BLOCK_R": 16, "K_TILES": 1, "USE_PDL": True}
    src = specialise(lora_linear_token_prefetch_kernel, LORA_PREFETCH_PTRS, cexp, LORA_PREFETCH_INTS)
    return triton.compile(src, target=TARGET, options={"num_warps": 16, "launch_pdl": True})


def rows() -> list[tuple[str, str, Optional[int], Optional[int], Optional[int]]]:
    """(kernel, role, registers, spill bytes, round trips after the wait)."""
    out = []

    def add(name: str, role: str, compiled) -> None:
        regs, spill = resources(compiled.asm["cubin"])
        out.append((name, role, regs, spill, round_trips_after_wait(_sass(compiled.asm["cubin"]) or "")))

    add("_rms_norm_kernel (residual)", "input / post-attention norm, no LoRA", compile_norm(None))
    add("_rms_norm_kernel + SHRINK", "input norm with the q/k/v shrink (12 more programs a token)",
        compile_norm(SHRINK))
    add("_rms_norm_kernel + DELTA", "post-attention norm with the o delta", compile_norm(_delta(H, 8)))
    add("_qk_norm_rope_kernel", "q/k norm + rotary, no LoRA", compile_qk(False))
    add("_qk_norm_rope_kernel + DELTA", "with the q/k/v deltas (8 q programs of 4 heads, k, v)", compile_qk(True))
    add("dense_gemv_kernel", "the o projection at one token, no LoRA", compile_gemv(False))
    add("dense_gemv_kernel + SHRINK", "with the o shrink (8 more programs a token)", compile_gemv(True))
    add("lora_linear_split_shrink_kernel", "the o shrink where the projection is not the GEMV (2+ tokens)",
        compile_o_shrink())
    add("lora_linear_token_prefetch_kernel", "removed: the q/k/v LoRA at 1 token", compile_lora_prefetch())
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lines = ["| kernel | role | registers | spills | round trips after the wait |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{k}` | {role} | {regs} | {spill} B | {trips} |" for k, role, regs, spill, trips in rows()]
    emit("\n".join(lines), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
