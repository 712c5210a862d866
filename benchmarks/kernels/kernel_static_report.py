"""Static report of the expert GEMM kernels compiled for an H100 / H200 (sm_90), no GPU needed.

Per variant (int4 ``UNPACK`` modes, MXFP4 decodes and split-K; the bf16 GEMM's tl.dot kernel at its H200 tuned /
heuristic tiles vs its FMA GEMV on pairwise launches) at the decode configs the heuristics
give for the layer shapes of issues 10-13: registers, spilled bytes, shared memory, and the main
K loop read from the SASS (``nvdisasm`` from Triton's bundled CUDA tools; PTX if it is missing):
instructions per weight element decoded (per thread: loop instructions / (BLOCK_K * BLOCK_N / threads)),
of which integer->float conversions (I2F / F2F: multi-function unit, 1/8 of the ALU rate) and shared
stores (layout conversions), and whether the loop is pipelined (cp.async = LDGSTS in the loop).

Arguments are specialised as at run time (16-byte aligned pointers; an int equal to 1 is a constant;
an int divisible by 16 is marked so), from the shapes' real strides.  Run without TRITON_INTERPRET:

    PYTHONPATH=. python benchmarks/kernels/kernel_static_report.py [--kernels int4 mxfp4 bf16] [--tokens 1 16]
        [--dtype bf16] [--group 128] [--shapes NAME ...] [--variants NAME ...] [--out report.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter replaces the compiler)")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, LoopStats, resources, specialise, main_loop_stats  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200
# name -> (hidden H, intermediate I, experts E, top_k)
INT4_SHAPES = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2)}
MXFP4_SHAPES = {"gpt-oss-20b": (2880, 2880, 32, 4), "gpt-oss-120b": (2880, 2880, 128, 4)}
INT4_VARIANTS = {"reshape (UNPACK 0)": dict(UNPACK=0, num_stages=4),
                 "dup words (UNPACK 1)": dict(UNPACK=1, num_stages=2),
                 "dup words + magic (UNPACK 2)": dict(UNPACK=2, num_stages=2),
                 "split by code, scales after the dot (UNPACK 3)": dict(UNPACK=3, num_stages=4),
                 "operands swapped, weight in registers (UNPACK 4)": dict(UNPACK=4, num_stages=1),
                 "operands swapped, int32 words, tf32 (UNPACK 5)": dict(UNPACK=5, num_stages=3),
                 # the FMA GEMV: one row per program (unsorted launches), BLOCK_SIZE_M rows per block (sorted)
                 "GEMV": dict(GEMV=1)}
# no SPLIT_K in a variant: auto_split_k's value
MXFP4_VARIANTS = {"PTX decode": dict(DECODE_ASM=1, SPLIT_K=1), "portable decode": dict(DECODE_ASM=0, SPLIT_K=1),
                  "PTX decode, split-K auto": dict(DECODE_ASM=1), "portable, split-K auto": dict(DECODE_ASM=0),
                  # the FMA GEMV at its own heuristic tiles and split (_gemv_config), 1 or 2 rows per pass
                  # (instructions per weight count each decoded weight once: per row, halve the 2-row figure)
                  "GEMV": dict(GEMV=1), "GEMV 2 rows": dict(GEMV=2)}
BF16_SHAPES = {"Qwen3-30B-A3B": (2048, 768, 128, 8), "Mixtral-8x7B": (4096, 14336, 8, 2),
               "gpt-oss-20b": (2880, 2880, 32, 4)}
# the GEMV runs on pairwise launches only (one pair per block: 1 token of the three shapes)
BF16_VARIANTS = {"tl.dot": dict(GEMV=0), "GEMV": dict(GEMV=1)}
_TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
@dataclass
class Row:
    kernel: str
    shape: str
    tokens: int
    gemm: str
    variant: str
    tiles: str
    regs: Optional[int]
    spill: Optional[int]
    shared: int
    loop: LoopStats


def compile_int4_gemv(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, zeros: bool = True,
                      group: int = 128):
    """The FMA GEMV of the unsorted small-batch path (``GEMV=1``)."""
    from vllm.model_executor.layers.fused_moe.ops._int4_gemv_kernel import _int4_gemv_kernel as fn

    dt, split = _TORCH_TO_TRITON[dtype], int(cfg.get("SPLIT_K", 1))
    ptrs = {"a_ptr": dt, "qw_ptr": "i32", "s_ptr": dt, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
            "out_ptr": "fp32" if split > 1 else dt, "topk_weights_ptr": "fp32", "pair_expert_ids_ptr": "i32"}
    G = K // group
    ints = dict(stride_am=K, stride_ak=1, stride_qe=K // 8 * N, stride_qk=N, stride_se=G * N, stride_sg=N,
                stride_ze=G * N, stride_zg=N, stride_pe=K, stride_os=num_pairs * N, stride_om=N, stride_on=1,
                N=N, K=K, top_k_in=2, magic=0x4B000000)
    cexp = dict(GROUP_SIZE=group, HAS_ZEROS=zeros, HAS_G_IDX=False, HAS_PERM=False, MUL_ROUTED_WEIGHT=False,
                EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0, EVEN_N=N % cfg["BLOCK_SIZE_N"] == 0, SPLIT_K=split,
                BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"])
    src = specialise(fn, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options=dict(num_warps=int(cfg.get("num_warps", 4)), num_stages=1))


def compile_int4_gemv_rows(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, zeros: bool = True,
                           group: int = 128):
    """The multi-row FMA GEMV of sorted routing (``GEMV=1``, ``_int4_gemv_rows_kernel.py``)."""
    from vllm.model_executor.layers.fused_moe.ops._int4_gemv_rows_kernel import _int4_gemv_rows_kernel as fn

    dt, split = _TORCH_TO_TRITON[dtype], int(cfg.get("SPLIT_K", 1))
    ptrs = {"a_ptr": dt, "qw_ptr": "i32", "s_ptr": dt, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
            "out_ptr": "fp32" if split > 1 else dt, "topk_weights_ptr": "fp32", "sorted_token_ids_ptr": "i32",
            "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
    G = K // group
    ints = dict(stride_am=K, stride_ak=1, stride_qe=K // 8 * N, stride_qk=N, stride_se=G * N, stride_sg=N,
                stride_ze=G * N, stride_zg=N, stride_pe=K, stride_os=num_pairs * N, stride_om=N, stride_on=1,
                N=N, K=K, num_pairs=num_pairs, top_k_in=2, magic=0x4B000000)
    cexp = dict(GROUP_SIZE=group, HAS_ZEROS=zeros, HAS_G_IDX=False, HAS_PERM=False, MUL_ROUTED_WEIGHT=False,
                EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0, EVEN_N=N % cfg["BLOCK_SIZE_N"] == 0, SPLIT_K=split,
                BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"])
    options = dict(num_warps=int(cfg.get("num_warps", 4)), num_stages=1)
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET, options=options)


def compile_int4(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, sorted_pairs: bool,
                 zeros: bool = True, group: int = 128):
    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_kernel import _int4_moe_gemm_kernel as fn
    from vllm.model_executor.layers.fused_moe.ops._int4_moe_gemm_swap_kernel import _int4_moe_gemm_swap_kernel

    if int(cfg.get("GEMV", 0)) and sorted_pairs:
        return compile_int4_gemv_rows(dtype, cfg, N=N, K=K, num_pairs=num_pairs, zeros=zeros, group=group)
    if int(cfg.get("GEMV", 0)):
        return compile_int4_gemv(dtype, cfg, N=N, K=K, num_pairs=num_pairs, zeros=zeros, group=group)
    dt, split = _TORCH_TO_TRITON[dtype], int(cfg.get("SPLIT_K", 1))
    ptrs = {"a_ptr": dt, "qw_ptr": "i32", "s_ptr": dt, "z_ptr": "u8", "g_ptr": "i32", "perm_ptr": "i32",
            "out_ptr": "fp32" if split > 1 else dt, "topk_weights_ptr": "fp32", "sorted_token_ids_ptr": "i32",
            "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
    G = K // group
    ints = dict(stride_am=K, stride_ak=1, stride_qe=K // 8 * N, stride_qk=N, stride_se=G * N, stride_sg=N,
                stride_ze=G * N, stride_zg=N, stride_pe=K, stride_os=num_pairs * N, stride_om=N, stride_on=1,
                N=N, K=K)
    if int(cfg.get("UNPACK", 0)) == 4:  # the swapped kernel reads the words' int16 view (strides in halves)
        fn, ptrs["qw_ptr"] = _int4_moe_gemm_swap_kernel, "i16"
        ints.update(stride_qe=K // 8 * N * 2, stride_qk=N * 2)
    elif int(cfg.get("UNPACK", 0)) == 5:
        fn = _int4_moe_gemm_swap_kernel
    cexp = dict(GROUP_SIZE=group, HAS_ZEROS=zeros, HAS_G_IDX=False, HAS_PERM=False, MUL_ROUTED_WEIGHT=False,
                UPCAST_DOT=False, EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0, SPLIT_K=split,
                BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"],
                GROUP_SIZE_M=max(1, int(cfg.get("GROUP_SIZE_M", 1))) if sorted_pairs else 1, SORTED=sorted_pairs,
                UNPACK=int(cfg.get("UNPACK", 0)))
    src = specialise(fn, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options=dict(num_warps=int(cfg.get("num_warps", 4)),
                                                           num_stages=int(cfg.get("num_stages", 3))))


def compile_bf16(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, bias: bool = False):
    """The bf16 grouped GEMM (``_fused_moe_gemm_kernel.py``) or, with ``GEMV``, its FMA GEMV (router weight on)."""
    dt = _TORCH_TO_TRITON[dtype]
    common = dict(N=N, K=K, top_k_in=1, stride_am=K, stride_ak=1, stride_we=N * K, stride_wn=K, stride_wk=1,
                  stride_om=N, stride_on=1, stride_be=N, stride_bn=1)
    if int(cfg.get("GEMV", 0)):
        from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemv_kernel import _fused_moe_gemv_kernel as fn

        split = int(cfg.get("SPLIT_K", 1))
        ptrs = {"a_ptr": dt, "w_ptr": dt, "out_ptr": "fp32" if split > 1 else dt, "bias_ptr": dt,
                "topk_weights_ptr": "fp32", "pair_expert_ids_ptr": "i32"}
        cexp = dict(HAS_BIAS=bias, MUL_ROUTED_WEIGHT=True, SPLIT_K=split, BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"],
                    BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"])
        ints = dict(common, stride_os=num_pairs * N)
    else:
        from vllm.model_executor.layers.fused_moe.ops._fused_moe_gemm_kernel import _fused_moe_gemm_kernel as fn

        ptrs = {"a_ptr": dt, "w_ptr": dt, "out_ptr": dt, "bias_ptr": dt, "topk_weights_ptr": "fp32",
                "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
        cexp = dict(HAS_BIAS=bias, MUL_ROUTED_WEIGHT=True, UPCAST_DOT=False, EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0,
                    BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"],
                    BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"], GROUP_SIZE_M=max(1, int(cfg.get("GROUP_SIZE_M", 1))))
        ints = dict(common, num_pid_m=num_pairs, num_pairs=num_pairs)
    options = dict(num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)))
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET, options=options)


def compile_mxfp4_reduce(dtype: torch.dtype, split: int, block_m: int, N: int):
    """The split-K reduction of the MXFP4 GEMM (bias and router weight on)."""
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import _mxfp4_split_k_reduce_kernel as fn

    dt = _TORCH_TO_TRITON[dtype]
    ptrs = {"part_ptr": "fp32", "out_ptr": dt, "bias_ptr": dt, "topk_weights_ptr": "fp32",
            "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32", "num_tokens_post_padded_ptr": "i32"}
    ints = dict(N=N, stride_om=N, stride_on=1, stride_be=N, stride_bn=1)
    cexp = dict(HAS_BIAS=True, MUL_ROUTED_WEIGHT=True, SPLIT_K=split, BLOCK_SIZE_M=block_m, BLOCK_N=128)
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET, options=dict(num_warps=4))


def compile_mxfp4_gemv(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, bias: bool = True):
    """The MXFP4 FMA GEMV (``GEMV=1``)."""
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_gemv_kernel import _mxfp4_gemv_kernel as fn

    dt, split = _TORCH_TO_TRITON[dtype], int(cfg.get("SPLIT_K", 1))
    ptrs = {"a_ptr": dt, "wq_ptr": "u8", "ws_ptr": "u8", "out_ptr": "fp32" if split > 1 else dt, "bias_ptr": dt,
            "topk_weights_ptr": "fp32", "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32",
            "num_tokens_post_padded_ptr": "i32"}
    ints = dict(stride_am=K, stride_ak=1, stride_qe=N * K // 2, stride_qn=K // 2, stride_se=N * K // 32,
                stride_sn=K // 32, stride_os=num_pairs * N, stride_om=N, stride_on=1, stride_be=N, stride_bn=1,
                N=N, K=K, top_k_in=4)
    cexp = dict(HAS_BIAS=bias and split == 1, MUL_ROUTED_WEIGHT=False, EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0,
                A_QUADS=dtype == torch.bfloat16, DECODE_ASM=bool(cfg.get("DECODE_ASM", 1)),
                BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"],
                SPLIT_K=split, ROWS=int(cfg["GEMV"]))
    src = specialise(fn, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options=dict(num_warps=int(cfg.get("num_warps", 4)), num_stages=1))


def compile_mxfp4(dtype: torch.dtype, cfg: dict, *, N: int, K: int, num_pairs: int, bias: bool = True):
    from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import _mxfp4_moe_gemm_kernel as fn

    if int(cfg.get("GEMV", 0)):
        return compile_mxfp4_gemv(dtype, cfg, N=N, K=K, num_pairs=num_pairs, bias=bias)

    dt, split = _TORCH_TO_TRITON[dtype], int(cfg.get("SPLIT_K", 1))
    ptrs = {"a_ptr": dt, "wq_ptr": "u8", "ws_ptr": "u8", "out_ptr": "fp32" if split > 1 else dt, "bias_ptr": dt,
            "topk_weights_ptr": "fp32", "sorted_token_ids_ptr": "i32", "block_expert_ids_ptr": "i32",
            "num_tokens_post_padded_ptr": "i32"}
    ints = dict(stride_am=K, stride_ak=1, stride_qe=N * K // 2, stride_qn=K // 2, stride_se=N * K // 32,
                stride_sn=K // 32, stride_os=num_pairs * N, stride_om=N, stride_on=1, stride_be=N, stride_bn=1,
                N=N, K=K)
    asm = bool(cfg.get("DECODE_ASM", 1)) and dtype == torch.bfloat16
    cexp = dict(HAS_BIAS=bias and split == 1, MUL_ROUTED_WEIGHT=False, DOT_F32=dtype == torch.float32,
                DECODE_ASM=asm, EVEN_K=K % cfg["BLOCK_SIZE_K"] == 0, SPLIT_K=split,
                BLOCK_SIZE_M=cfg["BLOCK_SIZE_M"], BLOCK_SIZE_N=cfg["BLOCK_SIZE_N"], BLOCK_SIZE_K=cfg["BLOCK_SIZE_K"],
                GROUP_SIZE_M=max(1, int(cfg.get("GROUP_SIZE_M", 1))))
    src = specialise(fn, ptrs, cexp, ints)
    return triton.compile(src, target=TARGET, options=dict(num_warps=int(cfg.get("num_warps", 4)),
                                                           num_stages=int(cfg.get("num_stages", 3))))


def _row(kind: str, shape: str, tokens: int, gemm: str, variant: str, cfg: dict, kernel, *,
         rows_gemv: bool = False) -> Row:
    regs, spill = resources(kernel.asm["cubin"])
    nw = int(cfg.get("num_warps", 4))
    tiles = (f"{cfg['BLOCK_SIZE_M']}x{cfg['BLOCK_SIZE_N']}x{cfg['BLOCK_SIZE_K']} w{nw} s{cfg.get('num_stages', 3)} "
             f"split {cfg.get('SPLIT_K', 1)}")
    gemv = bool(cfg.get("GEMV", 0))
    weights = cfg["BLOCK_SIZE_K"] * cfg["BLOCK_SIZE_N"]
    if gemv and rows_gemv:  # weights decoded per loop iteration: BLOCK_SIZE_M rows share each decode
        tiles = (f"GEMV rows {cfg['BLOCK_SIZE_M']}x{cfg['BLOCK_SIZE_N']}x{cfg['BLOCK_SIZE_K']} w{nw} "
                 f"split {cfg.get('SPLIT_K', 1)}")
    elif gemv:
        tiles = f"GEMV {cfg['BLOCK_SIZE_N']}x{cfg['BLOCK_SIZE_K']} w{nw} split {cfg.get('SPLIT_K', 1)}"
        if kind == "mxfp4":
            tiles += f" rows {cfg['GEMV']}"
    return Row(kind, shape, tokens, gemm, variant, tiles, regs, spill, kernel.metadata.shared,
               main_loop_stats(kernel, weights, nw, mma=not gemv, innermost=gemv and kind == "mxfp4"))


def int4_rows(tokens: list[int], dtype: torch.dtype, variants: dict, shapes: dict = INT4_SHAPES,
              group: int = 128) -> list[Row]:
    from vllm.kernel_configs.tile_config import Int4TileConfig
    from vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm import get_int4_moe_config, use_unsorted_int4_gemm

    rows = []
    for shape, (H, I, E, k) in shapes.items():
        for M in tokens:
            pairs = M * k
            srt = not use_unsorted_int4_gemm(pairs, E)
            for gemm, N, K in (("w13", 2 * I, H), ("w2", H, I)):
                base = get_int4_moe_config(pairs, E, N, K, group, dtype, sorted_pairs=srt)
                for name, over in variants.items():
                    if not over.get("GEMV") and base.gemv:  # a dot-kernel variant at the dot kernel's tiles
                        base = get_int4_moe_config(pairs, E, N, K, group, dtype, sorted_pairs=srt, gemv=False)
                    elif over.get("GEMV") and not base.gemv:  # the GEMV at its own heuristic tiles
                        base = get_int4_moe_config(pairs, E, N, K, group, dtype, sorted_pairs=srt, gemv=True)
                    cfg = Int4TileConfig.from_json(over, source=f"variant {name!r}", base=base).to_json()
                    kern = compile_int4(dtype, cfg, N=N, K=K, num_pairs=pairs, sorted_pairs=srt, group=group)
                    rows.append(_row("int4", shape, M, gemm, name, cfg, kern, rows_gemv=srt))
                    print(fmt_row(rows[-1]), flush=True)
    return rows


def mxfp4_rows(tokens: list[int], dtype: torch.dtype, variants: dict, shapes: dict = MXFP4_SHAPES) -> list[Row]:
    from vllm.kernel_configs.tile_config import Mxfp4TileConfig
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_moe_gemm import auto_split_k, get_mxfp4_moe_config

    rows = []
    for shape, (H, I, E, k) in shapes.items():
        for M in tokens:
            pairs = M * k
            for gemm, N, K in (("w13", 2 * I, H), ("w2", H, I)):
                for name, over in variants.items():
                    # a dot-kernel variant at the dot kernel's tiles, the GEMV at its own
                    base = get_mxfp4_moe_config(pairs, E, N, K, k, dtype, gemv=bool(over.get("GEMV", 0)))
                    tiles = Mxfp4TileConfig.from_json(over, source=f"variant {name!r}", base=base)
                    if "DECODE_ASM" in over and over["DECODE_ASM"] and dtype != torch.bfloat16:
                        continue  # the PTX decode is bf16 only
                    if "SPLIT_K" not in over and not tiles.gemv:
                        tiles = dataclasses.replace(tiles, split_k=auto_split_k(tiles, pairs, E, N, K))
                    cfg = tiles.to_json()
                    kern = compile_mxfp4(dtype, cfg, N=N, K=K, num_pairs=pairs)
                    rows.append(_row("mxfp4", shape, M, gemm, name, cfg, kern))
                    print(fmt_row(rows[-1]), flush=True)
                    if cfg["SPLIT_K"] > 1:  # its reduction must compile too
                        compile_mxfp4_reduce(dtype, cfg["SPLIT_K"], cfg["BLOCK_SIZE_M"], N)
    return rows


def bf16_rows(tokens: list[int], dtype: torch.dtype, variants: dict, shapes: dict = BF16_SHAPES,
              device_name: str = "NVIDIA H200") -> list[Row]:
    """The bf16 GEMM at the tiles a ``device_name`` GPU runs (its shipped tuned entry over the heuristic) and the
    GEMV at its heuristic tiles, on pairwise launches only (elsewhere the GEMV does not run)."""
    from vllm.kernel_configs.tile_config import tuned_tiles
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as g
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemv import gemv_config
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import use_pairwise_alignment

    rows = []
    for shape, (H, I, E, k) in shapes.items():
        for M in tokens:
            pairs = M * k
            for gemm, N, K, top_k in (("w13", 2 * I, H, k), ("w2", H, I, 1)):
                dot = tuned_tiles(g._gpu_config(pairs, E, N, K, dtype), "fused_moe_gemm", {"E": E, "N": N, "K": K},
                                  max(pairs // top_k, 1), device_name, check=g.check_tile_config)
                for name, over in variants.items():
                    if over.get("GEMV") and not use_pairwise_alignment(pairs, E):
                        continue
                    cfg = (gemv_config(pairs, N, K, dtype, dot.block_size_m) if over.get("GEMV") else dot).to_json()
                    kern = compile_bf16(dtype, cfg, N=N, K=K, num_pairs=pairs)
                    rows.append(_row("bf16", shape, M, gemm, name, cfg, kern))
                    print(fmt_row(rows[-1]), flush=True)
    return rows


HEADER = ("| kernel | shape | tokens | GEMM | variant | tiles | regs | spill (B) | shared (B) | loop instr. "
          "| instr. / weight | conversions / weight | shared stores / weight | pipelined |\n"
          "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")


def fmt_row(r: Row) -> str:
    lp = r.loop
    return (f"| {r.kernel} | {r.shape} | {r.tokens} | {r.gemm} | {r.variant} | {r.tiles} | {r.regs} | {r.spill} "
            f"| {r.shared}{' (!)' if r.shared > SHARED_LIMIT else ''} | {lp.instructions} ({lp.source}) "
            f"| {lp.per_weight:.2f} | {lp.converts_per_weight:.2f} | {lp.shared_stores_per_weight:.2f} "
            f"| {'yes' if lp.pipelined else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", nargs="+", default=["int4", "mxfp4"], choices=["int4", "mxfp4", "bf16"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted({*INT4_SHAPES, *MXFP4_SHAPES, *BF16_SHAPES}))
    p.add_argument("--variants", nargs="+", default=None, choices=[*INT4_VARIANTS, *MXFP4_VARIANTS, *BF16_VARIANTS])
    p.add_argument("--group", type=int, default=128, help="int4 scale group size")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pick = lambda d, names: {k: v for k, v in d.items() if names is None or k in names}  # noqa: E731
    print(HEADER, flush=True)
    rows = []
    if "int4" in args.kernels:
        rows += int4_rows(args.tokens, dtype, pick(INT4_VARIANTS, args.variants), pick(INT4_SHAPES, args.shapes),
                          args.group)
    if "mxfp4" in args.kernels:
        rows += mxfp4_rows(args.tokens, dtype, pick(MXFP4_VARIANTS, args.variants), pick(MXFP4_SHAPES, args.shapes))
    if "bf16" in args.kernels:
        rows += bf16_rows(args.tokens, dtype, pick(BF16_VARIANTS, args.variants), pick(BF16_SHAPES, args.shapes))
    if args.out:
        with open(args.out, "w") as f:
            f.write(HEADER + "\n" + "\n".join(map(fmt_row, rows)) + "\n")


if __name__ == "__main__":
    main()
