"""Benchmark of one MXFP4 fused-MoE layer (UnfusedOAITritonExperts) vs the bf16 TritonExperts layer,
and of MXFP4 with multi-LoRA, at the gpt-oss-20b / gpt-oss-120b layer shapes.

What is timed: ``layer.quant_method.apply(layer, x, topk_weights, topk_ids, lora_context=...)``
(routing precomputed; the region includes the expert sort, both GEMMs, the activation, the
top-k sum, and with LoRA the LoRA align and both LoRA seams), for
  bf16 base:  a FusedMoE with bf16 weights on TritonExperts (the same shape, random weights);
  MXFP4 base: a FusedMoE with quant_config=Mxfp4Config on UnfusedOAITritonExperts, no LoRA;
  MXFP4 LoRA: the same layer wrapped by FusedMoE3DWithLoRA, tokens round-robin over adapters.
Timing (CUDA graphs, L2 flushed before every replay, median) and the bandwidth peak are those of
``benchmark_moe_lora.py``.  Bytes = expert weights actually routed: bf16 D*3HI*2, MXFP4
D*3HI*17/32 (4.25 bits) + biases; GB/s = those bytes / time.

Correctness first, per shape: the MXFP4 layer (base, and with LoRA) against an fp32 torch
computation from the dequantised weights written here, on both experts paths; the run stops if it fails.

Paths (``fused_moe/experts/dequant_path.py``): at large batches UnfusedOAITritonExperts dequantises
each GEMM's weights once and runs the bf16 grouped GEMM.  ``--path auto`` (default) lets the
thresholds choose, ``kernel`` / ``dequant`` force one path for the MXFP4 columns; ``--compare-paths``
adds the base call timed on each forced path and, per shape, the token count from which the dequant
path wins (the threshold to set: ``MIN_PAIRS`` / ``MIN_PAIRS_PER_EXPERT["mxfp4"]``).  The timed graphs
include the path (``IN_CUDA_GRAPHS``), as an eager prefill would run it.

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_mxfp4.py [--quick] [--shapes 20b 120b]
        [--tokens 1 2 4 8 16 64 256 1024 4096] [--rank 16] [--num-loras 4] [--path auto|kernel|dequant]
        [--compare-paths] [--out table.md]
``--quick``: T in 1 16 256 4096 and 30 replays.  ``--smoke``: a tiny shape on CPU (interpreter).
``--portable-decode``: the kernel's Triton-arithmetic decode instead of its packed PTX one.
``--variants portable split-auto split-2 ...``: also time the MXFP4 base layer with each variant of
the kernel config (``portable``: DECODE_ASM 0; ``split-N``: SPLIT_K N; ``split-auto``: the SPLIT_K
of ``auto_split_k``; ``gemv`` / ``dot``: the FMA GEMV's / the tl.dot kernel's config whatever the
heuristic picks (``gemv1`` / ``gemv2``: the GEMV with 1 / 2 rows per pass); ``portable+split-auto``: both),
correctness-checked first, one column each (time and speed-up over the default MXFP4 layer).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _p in (_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmark_moe_lora import (FLUSH_BYTES, emit, norm_err, peak_bandwidth, pick_device, time_cpu,  # noqa: E402
                               time_cuda)
from moe_dequant_paths import (DEQUANT_HEADER, MXFP4_TILES, add_lora_deltas_flag, dequant_rows,  # noqa: E402
                               on_path, paths_table, set_lora_deltas, set_path)

# name -> (label, hidden H, intermediate I, experts E, top_k)
SHAPES = {"20b": ("gpt-oss-20b", 2880, 2880, 32, 4), "120b": ("gpt-oss-120b", 2880, 2880, 128, 4)}
SMOKE_SHAPE = ("smoke", 64, 64, 8, 2)
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
QUICK_TOKENS = [1, 16, 256, 4096]
SMOKE_TOKENS = [1, 7]
TOL = 3e-2  # bf16 normalised max error


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--reps", type=int, default=None, help="timed replays per case (default 100, --quick 30)")
    p.add_argument("--check-tokens", type=int, default=64)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer token counts and replays")
    p.add_argument("--smoke", action="store_true", help="tiny shape; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--portable-decode", action="store_true",
                   help="decode MXFP4 with portable Triton arithmetic instead of the packed PTX (bf16 on CUDA)")
    p.add_argument("--path", default="auto", choices=["auto", "kernel", "dequant"],
                   help="MXFP4 experts path: the thresholds (auto), the in-register kernel, or dequantise + bf16 GEMM")
    p.add_argument("--compare-paths", action="store_true",
                   help="also time the base call on each forced path and report the crossover")
    p.add_argument("--variants", nargs="*", default=[], type=_check_variant,
                   help="kernel config variants timed beside the default: portable, split-N, split-auto, "
                        "joined with + (e.g. portable+split-auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also list the kernels of the base and LoRA calls per token count (torch.profiler, eager)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    add_lora_deltas_flag(p)
    return p.parse_args()


def _check_variant(name: str) -> str:
    for part in name.split("+"):
        if part not in ("portable", "gemv", "gemv1", "gemv2", "dot") and not (
                part.startswith("split-") and (part[6:] == "auto" or part[6:].isdigit())):
            raise argparse.ArgumentTypeError(f"unknown variant {part!r}: portable, gemv, gemv1, gemv2, dot, "
                                             "split-N or split-auto")
    return name


@contextlib.contextmanager
def config_variant(name: str):
    """Within the block, the MXFP4 experts' GEMMs run the kernel config variant ``name`` (see --variants)."""
    from vllm.model_executor.layers.fused_moe.ops import mxfp4_moe_gemm as mod

    parts = name.split("+")
    orig = mod.get_mxfp4_moe_config

    def patched(num_pairs, num_experts, N, K, top_k, dtype, gemv=None):
        kernel = [p for p in parts if p.startswith("gemv") or p == "dot"]
        cfg = orig(num_pairs, num_experts, N, K, top_k, dtype, gemv=kernel[-1] != "dot" if kernel else gemv)
        for part in parts:
            if part in ("gemv", "dot"):
                continue
            if part in ("gemv1", "gemv2"):
                cfg = dataclasses.replace(cfg, gemv=int(part[4]))
            elif part == "portable":
                cfg = dataclasses.replace(cfg, decode_asm=0)
            elif part == "split-auto":
                cfg = dataclasses.replace(cfg, split_k=mod.auto_split_k(cfg, num_pairs, num_experts, N, K))
            else:
                cfg = dataclasses.replace(cfg, split_k=int(part[6:]))
        return cfg

    mod.get_mxfp4_moe_config = patched
    try:
        yield
    finally:
        mod.get_mxfp4_moe_config = orig


@dataclass
class Layers:
    name: str
    H: int
    I: int
    E: int
    k: int
    mx: object  # FusedMoE, MXFP4
    mx_lora: object  # FusedMoE3DWithLoRA around mx
    bf16: object  # FusedMoE, bf16 weights, TritonExperts
    punica: object
    adapters: list  # (w13_a [E, R, H], w13_b [E, 2I, R], w2_a [E, R, I], w2_b [E, H, R])
    ck: dict  # the checkpoint tensors (the reference's weights: the layer may have repacked its own)


def build(shape, dtype, device, rank: int, num_loras: int, max_tokens: int, seed: int) -> Layers:
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE
    from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config

    name, H, I, E, k = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    common = dict(params_dtype=dtype, device=device, activation="swigluoai", has_bias=True, renormalize=False,
                  topk_then_softmax=True, moe_backend="triton", max_num_tokens=max(max_tokens, 8192))
    mx = FusedMoE(E, k, H, I, quant_config=Mxfp4Config(), lora_enabled=True, prefix="bench.mlp.experts", **common)
    u8 = lambda shape, lo, hi: torch.randint(lo, hi, shape, dtype=torch.uint8, device=device, generator=gen)  # noqa
    ck = {"gate_up_proj_blocks": u8((E, 2 * I, H // 32, 16), 0, 256),
          "gate_up_proj_scales": u8((E, 2 * I, H // 32), 118, 121),  # |w| ~ H^-1/2
          "gate_up_proj_bias": torch.randn(E, 2 * I, device=device, generator=gen) * 0.1,
          "down_proj_blocks": u8((E, H, I // 32, 16), 0, 256),
          "down_proj_scales": u8((E, H, I // 32), 118, 121),
          "down_proj_bias": torch.randn(E, H, device=device, generator=gen) * 0.1}
    for suffix, t in ck.items():
        mx.quant_method.load_checkpoint_tensor(mx, suffix, t)
    mx.process_weights_after_loading()
    experts = type(mx.quant_method.kernel.fused_experts).__name__
    if experts != "UnfusedOAITritonExperts":
        sys.exit(f"expected UnfusedOAITritonExperts, the MXFP4 layer runs {experts}")
    mx_lora = FusedMoE3DWithLoRA(mx)
    mx_lora.create_lora_weights(num_loras, LoRAConfig(max_loras=num_loras, max_lora_rank=rank))
    rnd = lambda shape, std: (torch.randn(shape, device=device, generator=gen) * std).to(dtype)  # noqa: E731
    adapters = []
    for slot in range(num_loras):
        ad = (rnd((E, rank, H), H ** -0.5), rnd((E, 2 * I, rank), 0.5 * rank ** -0.5),
              rnd((E, rank, I), I ** -0.5), rnd((E, H, rank), 0.5 * rank ** -0.5))
        mx_lora.set_lora(slot, w13_lora_a=[ad[0]], w13_lora_b=[ad[1]], w2_lora_a=ad[2], w2_lora_b=ad[3])
        adapters.append(ad)
    punica = get_punica_wrapper(max_tokens, num_loras, device, kind="gpu")
    mx_lora.set_mapping(punica)
    bf = FusedMoE(E, k, H, I, **common)
    for e in range(E):
        bf.w13_weight.data[e].copy_(rnd((2 * I, H), H ** -0.5))
        bf.w2_weight.data[e].copy_(rnd((H, I), I ** -0.5))
    bf.process_weights_after_loading()
    return Layers(name, H, I, E, k, mx, mx_lora, bf, punica, adapters, ck)


def inputs(L: Layers, M: int, num_loras: int, dtype, device, seed: int):
    from vllm.model_executor.layers.fused_moe.router import fused_topk

    gen = torch.Generator(device=device).manual_seed(seed + M)
    x = torch.randn(M, L.H, generator=gen, device=device).to(dtype)
    logits = torch.randn(M, L.E, generator=gen, device=device)
    tw, ti = fused_topk(logits, L.k, renormalize=False, topk_then_softmax=True)
    return x, logits, tw, ti, torch.arange(M, dtype=torch.int32) % num_loras


def reference(L: Layers, x, tw, ti, slots, with_lora: bool) -> torch.Tensor:
    """fp32 gpt-oss MoE (+ per-token LoRA) from the checkpoint's MXFP4 weights, dequantised per expert."""
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4

    ck = L.ck
    M, H = x.shape
    experts = ti.reshape(-1).long()
    token = torch.arange(M * L.k, device=x.device) // L.k
    slot_p = slots.to(x.device).long()[token]
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():
        p = (experts == e).nonzero().squeeze(1)
        xe = x.float()[token[p]]
        h = xe @ dequantize_mxfp4(ck["gate_up_proj_blocks"][e], ck["gate_up_proj_scales"][e]).T \
            + ck["gate_up_proj_bias"][e].float()
        masks = [(s, slot_p[p] == s) for s in range(len(L.adapters))] if with_lora else []
        for s, m in masks:
            a, b, _, _ = L.adapters[s]
            h[m] += (xe[m] @ a[e].float().T) @ b[e].float().T
        gate, up = h[:, 0::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
        act = (up + 1) * gate * torch.sigmoid(1.702 * gate)
        y = act @ dequantize_mxfp4(ck["down_proj_blocks"][e], ck["down_proj_scales"][e]).T \
            + ck["down_proj_bias"][e].float()
        for s, m in masks:
            _, _, a, b = L.adapters[s]
            y[m] += (act[m] @ a[e].float().T) @ b[e].float().T
        out.index_add_(0, token[p], y * tw.reshape(-1)[p, None].float())
    return out


def check(L: Layers, M: int, num_loras: int, dtype, device, seed: int, path: str = "auto") -> str:
    """Both paths (the in-register kernel, dequantise + bf16 GEMM) against the fp32 reference."""
    out = "; ".join(f"{p}: {check_path(L, M, num_loras, dtype, device, seed, p)}" for p in ("kernel", "dequant"))
    set_path(path)
    return out


def check_path(L: Layers, M: int, num_loras: int, dtype, device, seed: int, path: str) -> str:
    set_path(path)
    x, logits, tw, ti, slots = inputs(L, M, num_loras, dtype, device, seed)
    L.punica.update_metadata(slots)
    qm, ctx = L.mx.quant_method, L.mx._lora_context
    ref_lora, ref_base = reference(L, x, tw, ti, slots, True), reference(L, x, tw, ti, slots, False)
    errs = {"MXFP4 + LoRA forward": norm_err(L.mx_lora(x, logits), ref_lora),
            "MXFP4 + LoRA experts call": norm_err(qm.apply(L.mx, x, tw, ti, lora_context=ctx), ref_lora),
            "MXFP4 base experts call": norm_err(qm.apply(L.mx, x, tw, ti, lora_context=None), ref_base)}
    effect = norm_err(ref_base, ref_lora)
    tol = TOL if dtype == torch.bfloat16 else 1e-2
    if any(not e < tol for e in errs.values()) or effect < 10 * tol:
        sys.exit(f"CORRECTNESS FAILED for {L.name} at {M} tokens, {path} path: {errs} (tolerance {tol}); "
                 f"LoRA effect {effect:.3f}")
    return ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tol {tol:.0e}; LoRA effect {effect:.2f})"


def run_case(L: Layers, M: int, args, dtype, device, flush, peak: float) -> dict:
    x, _, tw, ti, slots = inputs(L, M, args.num_loras, dtype, device, args.seed)
    L.punica.update_metadata(slots)
    mq, bq, ctx = L.mx.quant_method, L.bf16.quant_method, L.mx._lora_context
    base = lambda: mq.apply(L.mx, x, tw, ti, lora_context=None)  # noqa: E731
    fns = {"bf16": lambda: bq.apply(L.bf16, x, tw, ti, lora_context=None),
           "mx": on_path(args.path, base),
           "mx_lora": on_path(args.path, lambda: mq.apply(L.mx, x, tw, ti, lora_context=ctx))}
    if args.compare_paths:  # each MXFP4 fn sets its path: the order does not matter
        fns.update(kernel=on_path("kernel", base), dequant=on_path("dequant", base))
    t, graphs = {}, []
    timer = (lambda fn: time_cuda(fn, flush, args.reps, not args.no_graph)) if device.type == "cuda" \
        else (lambda fn: time_cpu(fn, args.reps))
    for key, fn in fns.items():
        us, graph, note = timer(fn)
        t[key] = us
        graphs.append(graph)
        if note:
            print(f"    note ({key}): {note}")
    variants = {}
    for name in args.variants:
        with config_variant(name):
            ref = reference(L, x, tw, ti, slots, False)
            err = norm_err(fns["mx"](), ref)
            if not err < (TOL if dtype == torch.bfloat16 else 1e-2):
                sys.exit(f"CORRECTNESS FAILED: variant {name} at {M} tokens: error {err:.2e}")
            variants[name] = timer(fns["mx"])[0]
    D = int(torch.unique(ti).numel())
    w = D * 3 * L.H * L.I
    mx_bytes = w * 17 // 32 + D * (3 * L.I) * x.element_size()  # codes + scales + biases
    bf_bytes = w * 2
    return dict(shape=L.name, tokens=M, experts=D, bf16=t["bf16"], mx=t["mx"], mx_lora=t["mx_lora"],
                speedup=t["bf16"] / t["mx"], ratio=t["mx_lora"] / t["mx"], mx_gbs=mx_bytes / (t["mx"] * 1e-6) / 1e9,
                bf_gbs=bf_bytes / (t["bf16"] * 1e-6) / 1e9, roof=100 * (mx_bytes / peak * 1e6) / t["mx"],
                graph="yes" if all(graphs) else "no", pairs_per_expert=M * L.k / L.E, kernel=t.get("kernel"),
                dequant=t.get("dequant"), variants=variants)


def profile_case(L: Layers, M: int, args, dtype, device, flush) -> str:
    """The kernels of the base and the LoRA call at M tokens, side by side (``profile_moe_lora.table``)."""
    from profile_moe_lora import kernel_times
    from profile_moe_lora import table as kernel_table

    x, _, tw, ti, slots = inputs(L, M, args.num_loras, dtype, device, args.seed)
    L.punica.update_metadata(slots)
    qm, ctx = L.mx.quant_method, L.mx._lora_context
    base = kernel_times(lambda: qm.apply(L.mx, x, tw, ti, lora_context=None), 10, flush)
    lora = kernel_times(lambda: qm.apply(L.mx, x, tw, ti, lora_context=ctx), 10, flush)
    text, tb, tl = kernel_table(base, lora)
    return f"{L.name}, {M} tokens (sum of device time: base {tb:.1f} us, LoRA {tl:.1f} us):\n\n{text}\n"


def table(rows: list[dict], gpu: str) -> str:
    names = list(rows[0]["variants"]) if rows else []
    lines = ["| shape | tokens | experts | bf16 base (us) | MXFP4 base (us) | bf16 / MXFP4 | MXFP4 + LoRA (us) "
             "| LoRA / base | MXFP4 GB/s | bf16 GB/s | MXFP4 % of roofline | graph | GPU |"
             + "".join(f" {n} (us, speed-up) |" for n in names),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['experts']} | {r['bf16']:.1f} | {r['mx']:.1f} "
                     f"| {r['speedup']:.2f} | {r['mx_lora']:.1f} | {r['ratio']:.2f} | {r['mx_gbs']:.4g} "
                     f"| {r['bf_gbs']:.4g} | {r['roof']:.0f} % | {r['graph']} | {gpu} |"
                     + "".join(f" {r['variants'][n]:.1f} ({r['mx'] / r['variants'][n]:.2f}x) |" for n in names))
    return "\n".join(lines)


def dequant_stages(L: Layers):
    """The two GEMMs' MXFP4 weights, as ``moe_dequant_paths.dequant_rows`` takes them."""
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_expert_dequant import dequantize_mxfp4_experts

    stages = []
    for label, prefix in (("w13", "gate_up_proj"), ("w2", "down_proj")):
        blocks, scales = L.ck[f"{prefix}_blocks"], L.ck[f"{prefix}_scales"]
        run = (lambda b, s: lambda out, e0, e1, bn, bk: dequantize_mxfp4_experts(
            b, s, out, e0, e1, use_triton=True, block_n=bn, block_k=bk))(blocks, scales)
        E, N = blocks.shape[:2]
        stages.append((label, E, N, blocks.shape[2] * 32, (blocks[0].numel() + scales[0].numel()), run))
    return stages


def main() -> None:
    args = parse_args()
    device = pick_device(args.smoke)
    has_cuda = device.type == "cuda"
    set_lora_deltas(args.lora_deltas, "oai_triton_experts", "UnfusedOAITritonExperts")
    if args.portable_decode:
        from vllm.model_executor.layers.fused_moe.ops import mxfp4_moe_gemm

        mxfp4_moe_gemm.use_decode_asm = lambda dtype, config: False
    dtype = torch.bfloat16 if has_cuda else torch.float32  # the interpreter's bf16 dot is wrong
    if args.compare_paths or args.variants or args.portable_decode:  # Triton kernel variants: keep the blocks
        os.environ["VLLM_MXFP4_MMA"] = "0"
    mma = "tensor-core kernel" if os.environ.get("VLLM_MXFP4_MMA", "1") != "0" and has_cuda else "Triton kernels"
    shapes = [SMOKE_SHAPE] if args.smoke else [SHAPES[s] for s in args.shapes]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else QUICK_TOKENS if args.quick else TOKENS)
    check_m = min(args.check_tokens, 16) if args.smoke else args.check_tokens
    args.reps = args.reps or (2 if not has_cuda else 30 if args.quick else 100)
    gpu = torch.cuda.get_device_name(device) if has_cuda else "cpu (interpreter)"
    peak = peak_bandwidth(device)
    set_path(args.path)
    decode = "portable" if args.portable_decode else "packed PTX"
    print(f"device: {gpu}; activations {dtype}; experts path {args.path}; MXFP4 decode {decode}; {mma} where the "
          f"weights allow (VLLM_MXFP4_MMA); rank {args.rank}; "
          f"{args.num_loras} adapters; copy bandwidth peak (read + write): {peak / 1e9:.0f} GB/s", flush=True)
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if has_cuda else None
    rows, dq_lines, prof_lines = [], [], []
    for shape in shapes:
        L = build(shape, dtype, device, args.rank, args.num_loras, max(max(tokens), check_m), args.seed)
        print(f"[{L.name}] H={L.H} I={L.I} E={L.E} top_k={L.k}: correctness at {check_m} tokens: "
              f"{check(L, check_m, args.num_loras, dtype, device, args.seed, args.path)}", flush=True)
        for M in tokens:
            r = run_case(L, M, args, dtype, device, flush, peak)
            print(f"  {M:5d} tokens: bf16 {r['bf16']:8.1f} us  MXFP4 {r['mx']:8.1f} us ({r['speedup']:.2f}x)  "
                  f"+LoRA {r['mx_lora']:8.1f} us (ratio {r['ratio']:.2f})  {r['mx_gbs']:6.0f} GB/s"
                  + (f"  kernel {r['kernel']:.1f} / dequant {r['dequant']:.1f} us" if args.compare_paths else ""),
                  flush=True)
            rows.append(r)
            if args.profile:
                prof_lines.append(profile_case(L, M, args, dtype, device, flush))
        if args.compare_paths:
            timer = ((lambda fn: time_cuda(fn, flush, args.reps, not args.no_graph)[0]) if has_cuda
                     else (lambda fn: time_cpu(fn, 1)[0]))
            dq_lines += dequant_rows(L.name, dequant_stages(L), MXFP4_TILES, dtype, device, timer, peak)
        del L
        if has_cuda:
            torch.cuda.empty_cache()
    text = "\n".join([f"## MXFP4 MoE layer vs bf16, and MXFP4 with multi-LoRA: {gpu}", "", table(rows, gpu), "",
                      "Notes: timed `quant_method.apply` (sort, GEMMs, activation, top-k sum; with LoRA also the LoRA "
                      "align and seams), CUDA graph replay with the L2 flushed, median of "
                      f"{args.reps}; bytes = routed expert weights (MXFP4 4.25 bits + biases, bf16 2 bytes); "
                      f"peak {peak / 1e9:.0f} GB/s from a device copy; experts path {args.path}; MXFP4 GEMMs on the "
                      f"{mma}.", ""])
    if args.compare_paths:
        text += "\n".join(["", "### MXFP4 experts paths: in-register kernel vs dequantise + bf16 GEMM (base call)", "",
                           paths_table(rows, "MXFP4", "bf16 base"), "",
                           "The MXFP4 dequantiser alone (one scratch of experts):", "",
                           *DEQUANT_HEADER, *dq_lines, ""])
    if prof_lines:
        text += "\n".join(["", "### Kernels of one call (torch.profiler, eager, L2 flushed; device us per call)", "",
                           *prof_lines, ""])
    emit(text, args.out)


if __name__ == "__main__":
    main()
