"""Static report of the MoE LoRA sorted kernels compiled for an H100 / H200 (sm_90), no GPU needed.

Today's one-launch ``moe_lora_sorted_kernel`` at the config the launcher picks (shipped tuned file for
the NVIDIA H200, else the heuristic), the same with its block ids in one round trip (``EARLY_IDS``),
against the split-K variant (``moe_lora_split.py``: shrink launch + expand launch) at several
``SHRINK_SPLIT_K``, for the Qwen3-30B-A3B layer (H=2048, I=768, E=128, top-8, rank 16, 4 adapters) at decode
token counts.  Per kernel: registers, spilled bytes, shared memory, the
K loop (instructions, cp.async = LDGSTS in it: pipelined), and the chain of dependent global memory
round trips one program waits for, read from the SASS (``memory_chain``: straight-line dataflow, each
loop body once, early exits count as dependences); for today's kernel the K loop's share is added:
ceil(K tiles / (stages - 1)) waits with ``num_stages - 1`` tiles in flight.  Run without TRITON_INTERPRET:

    PYTHONPATH=. python benchmarks/kernels/moe_lora_static_report.py [--tokens 16 64 256] [--splits 4 8 16]
        [--expand-stages 1] [--out report.md]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET (the interpreter replaces the compiler)")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, _sass, _sass_loops, resources, specialise  # noqa: E402

H, I, E, TOP_K, L, R = 2048, 768, 128, 8, 4, 16
DEVICE = "NVIDIA H200"
_REG = re.compile(r"\b(U?R\d+|U?P\d+)(?:\.(64|128))?")
_WIDTH = {"64": 2, "128": 4}


def _regs(text: str) -> list[str]:
    out = []
    for m in _REG.finditer(text):
        n = _WIDTH.get(m.group(2), 1)
        kind, num = re.match(r"(U?[RP])(\d+)", m.group(1)).groups()
        out += [f"{kind}{int(num) + i}" for i in range(n)]
    return out


def memory_chain(sass: str) -> int:
    """Dependent global memory round trips before the last global store, over the straight-line SASS.

    Each register carries the number of global loads its value waited for; a global load's result is one
    more than its inputs; after ``DEPBAR`` the shared memory filled by cp.async counts as loaded; a guarded
    ``EXIT`` / ``BRA`` makes everything after it depend on its predicate."""
    depth: dict[str, int] = {}
    ctrl = cp_async = shared = best = 0
    for line in sass.splitlines():
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if not m:
            continue
        guard, op, rest = m.group(1) or "", m.group(2), m.group(3)
        operands = [o.strip() for o in rest.split(",")]
        writes_first = not op.startswith(("ST", "BRA", "EXIT", "BAR", "DEPBAR", "LDGSTS", "RED", "LDGDEPBAR"))
        dst = _regs(operands[0]) if writes_first and operands and operands[0] else []
        srcs = _regs(guard) + [r for o in (operands[1:] if writes_first else operands) for r in _regs(o)]
        d_in = max([ctrl] + [depth.get(r, 0) for r in srcs if not r.endswith(("RZ", "PT"))])
        if op.startswith("LDGSTS"):
            cp_async = max(cp_async, d_in + 1)
        elif op.startswith("DEPBAR"):
            shared = max(shared, cp_async)
        elif op.startswith(("EXIT", "BRA")) and guard:
            ctrl = max(ctrl, d_in)
        elif op.startswith(("STG", "RED", "ATOMG")):
            best = max(best, d_in + 1)
        d_out = d_in + 1 if op.startswith("LDG") else max(d_in, shared) if op.startswith("LDS") else d_in
        for r in dst:
            depth[r] = d_out
    return best


def _shape(gemm: str, M: int) -> dict:
    numel = M * TOP_K
    if gemm == "w13":
        K, N, S, cols, top_k_in, mul_w = H, I, 2, 2 * I, TOP_K, False
    else:
        K, N, S, cols, top_k_in, mul_w = I, H, 1, H, 1, True
    ints = dict(numel=numel, top_k=TOP_K, top_k_in=top_k_in, K=K, N=N, R=R, num_experts=E, stride_xm=K,
                stride_xk=1, stride_as=L * E * R * K if S > 1 else 0, stride_al=E * R * K, stride_ae=R * K,
                stride_ar=K, stride_ak=1, stride_bs=L * E * N * R if S > 1 else 0, stride_bl=E * N * R,
                stride_be=N * R, stride_bn=R, stride_br=1, stride_ot=TOP_K * cols, stride_oj=cols, stride_on=1,
                out_col0=0, out_slice_cols=N, stride_ss=0, stride_sp=0, stride_sr=0,
                stride_pk=S * numel * R, stride_ps=numel * R, stride_pp=R)  # partials [parts, S, pairs, R]
    return dict(K=K, N=N, S=S, mul_w=mul_w, ints=ints, numel=numel)


_PTRS = dict(x_ptr="bf16", a_ptr="bf16", b_ptr="bf16", out_ptr="bf16", shrunk_ptr="fp32", part_ptr="fp32",
             w_ptr="fp32", sorted_ids_ptr="i32", block_vids_ptr="i32", num_post_padded_ptr="i32")


def _compile(fn, ints: dict, cexp: dict, warps: int, stages: int):
    ptrs = {k: v for k, v in _PTRS.items() if k in fn.arg_names}
    ints = {k: v for k, v in ints.items() if k in fn.arg_names}
    cexp = {k: v for k, v in cexp.items() if k in fn.arg_names}
    return triton.compile(specialise(fn, ptrs, cexp, ints), target=TARGET,
                          options=dict(num_warps=warps, num_stages=stages))


def _stats(kernel) -> dict:
    regs, spill = resources(kernel.asm["cubin"])
    sass = _sass(kernel.asm["cubin"]) or ""
    loops = [lp for lp in _sass_loops(sass) if any(op.startswith(("HMMA", "HGMMA")) for op in lp)]  # in SASS order
    loops = ", ".join(f"{len(lp)}{' (cp.async)' if any(op.startswith('LDGSTS') for op in lp) else ''}"
                      for lp in loops)
    return dict(regs=regs, spill=spill, shared=kernel.metadata.shared, chain=memory_chain(sass), loops=loops or "-")


def rows_for(M: int, splits: list[int], expand_stages: int = 1) -> list[dict]:
    from vllm.lora.ops.triton_ops import _fused_moe_lora_kernels as k1, _moe_lora_split_kernels as k2
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config
    from vllm.lora.ops.triton_ops.moe_lora_split import split_layout

    rows = []
    for gemm in ("w13", "w2"):
        g = _shape(gemm, M)
        cfg = get_moe_lora_config(f"fused_moe_lora_{gemm}", num_pairs=g["numel"], num_experts=E, max_loras=L, rank=R,
                                  K=g["K"], N=g["N"], num_slices=g["S"], dtype=torch.bfloat16, use_tuned_config=True,
                                  device_name=DEVICE)
        n_tiles = -(-g["N"] // cfg.block_size_n)
        base = dict(UPCAST=False, FP32_PRECISION="tf32x3", EXPAND_MODE=1, BLOCK_M=cfg.block_size_m,
                    BLOCK_N=cfg.block_size_n, BLOCK_R=16, MUL_ROUTED_WEIGHT=g["mul_w"])
        ints = dict(g["ints"], num_n_splits=cfg.num_n_splits)
        fused = dict(base, DO_SHRINK=True, DO_EXPAND=True, BLOCK_K=cfg.block_size_k)
        st = _stats(_compile(k1.moe_lora_sorted_kernel, ints, fused, cfg.num_warps, cfg.num_stages))
        k_tiles = -(-g["K"] // cfg.block_size_k)
        n_per_prog = -(-n_tiles // max(1, min(cfg.num_n_splits, n_tiles)))
        st["chain_total"] = st["chain"] + -(-k_tiles // max(1, cfg.num_stages - 1)) - 1 + n_per_prog - 1
        tiles = (f"BM {cfg.block_size_m} BN {cfg.block_size_n} BK {cfg.block_size_k} n-splits {cfg.num_n_splits} "
                 f"w{cfg.num_warps} s{cfg.num_stages}")
        rows.append(dict(M=M, gemm=gemm, variant="one launch, ids in turn", kernel="moe_lora_sorted_kernel",
                         tiles=tiles, **st))
        # the same launch with the block's ids loaded together (fused_moe_lora.SORTED_EARLY_IDS, shipped)
        ei = _stats(_compile(k1.moe_lora_sorted_kernel, ints, dict(fused, EARLY_IDS=True), cfg.num_warps,
                             cfg.num_stages))
        ei["chain_total"] = ei["chain"] + -(-k_tiles // max(1, cfg.num_stages - 1)) - 1 + n_per_prog - 1
        rows.append(dict(M=M, gemm=gemm, variant="one launch, early ids (today)", kernel="moe_lora_sorted_kernel",
                         tiles=tiles, **ei))
        for s in splits:
            width, parts = split_layout(g["K"], s)
            if parts < 2:
                continue
            sh = _stats(_compile(k2.moe_lora_split_shrink_kernel, g["ints"], dict(base, BLOCK_K=width),
                                 cfg.num_warps, cfg.num_stages))
            rows.append(dict(M=M, gemm=gemm, variant=f"split K {parts} x {width}", kernel="shrink",
                             tiles=f"BM {cfg.block_size_m} BK {width} w{cfg.num_warps}", chain_total=sh["chain"], **sh))
            ints = dict(g["ints"], num_n_splits=n_tiles)
            ex = _stats(_compile(k2.moe_lora_split_expand_kernel, ints, dict(base, NUM_PARTS=parts), cfg.num_warps,
                                 expand_stages))
            rows.append(dict(M=M, gemm=gemm, variant=f"split K {parts} x {width}", kernel="expand",
                             tiles=f"BN {cfg.block_size_n} n-splits {n_tiles} (one N tile each) s{expand_stages}",
                             chain_total=ex["chain"], **ex))
    return rows


HEADER = ("| tokens | GEMM | variant | kernel | tiles | regs | spill (B) | shared (B) | loops with MMAs: instr. "
          "| memory chain (SASS) | chain per program |\n|---:|---|---|---|---|---:|---:|---:|---|---:|---:|")


def fmt(r: dict) -> str:
    return (f"| {r['M']} | {r['gemm']} | {r['variant']} | {r['kernel']} | {r['tiles']} | {r['regs']} | {r['spill']} "
            f"| {r['shared']} | {r['loops']} | {r['chain']} | {r['chain_total']} |")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[64])
    p.add_argument("--splits", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--expand-stages", type=int, default=1, help="num_stages of the split variant's expand")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    print(HEADER, flush=True)
    rows = []
    for M in args.tokens:
        for r in rows_for(M, args.splits, args.expand_stages):
            rows.append(r)
            print(fmt(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(HEADER + "\n" + "\n".join(map(fmt, rows)) + "\n")


if __name__ == "__main__":
    main()
