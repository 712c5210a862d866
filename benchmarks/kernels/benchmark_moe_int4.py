"""Benchmark of one int4 (W4A16, group-quantized) MoE layer: MarlinExperts vs bf16 TritonExperts, and LoRA.

What is timed: ``layer.quant_method.apply(layer, x, topk_weights, topk_ids, lora_context=...)`` of
  - int4: a ``FusedMoE`` with ``Int4MoEMethod`` weights (random codes, scales, zero points; group
    ``--group``), backend MarlinExperts, wrapped by ``FusedMoEWithLoRA``; base = ``lora_context=None``,
    LoRA = the layer's context (``--num-loras`` adapters of rank ``--rank``, tokens round-robin);
  - bf16: the same layer shape with the dequantised weights in ``--dtype``, backend TritonExperts, base only.
Routing is precomputed, as in ``benchmark_moe_lora.py`` (whose timing helpers this script uses:
CUDA-graph replay, L2 flushed before each replay, median of ``--reps``).

Bytes: int4 = D * (packed weights + scales + zeros of one expert) (D = distinct experts routed),
plus the LoRA weights of the routed (adapter, expert) pairs for the LoRA column; "% of roofline" =
(bytes / copy-bandwidth peak) / time.

Correctness first, per shape: the int4 LoRA forward, the int4 base call and the bf16 base call are
compared with an fp32 computation on the dequantised weights (``benchmark_moe_lora.reference``).

Targets (issue 13): int4 >= 2.5x faster than bf16 at 1-16 tokens, no slower at 256, LoRA / base <= 1.15.

Paths (``fused_moe/experts/dequant_path.py``): at large batches MarlinExperts dequantises each GEMM's
weights once and runs the bf16 grouped GEMM.  ``--path auto`` (default) lets the thresholds choose,
``kernel`` / ``dequant`` force one path for the int4 columns; ``--compare-paths`` adds the base call
timed on each forced path and prints, per shape, from which token count the dequant path wins (the
threshold to set: ``MIN_PAIRS`` / ``MIN_PAIRS_PER_EXPERT["int4"]``).  Correctness is checked on both
paths.  The timed graphs include the path (``IN_CUDA_GRAPHS``), as an eager prefill would run it.

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_int4.py [--quick] [--shapes qwen3 mixtral]
        [--tokens 1 2 4 8 16 64 256 1024 4096] [--group 128] [--path auto|kernel|dequant] [--compare-paths]
        [--out table.md]
    --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (exercises the code path only).
    --sweep: per shape, token count and GEMM, time the int4 GEMM alone with the heuristic's tiles and
    with alternatives (each checked against the heuristic's output first), among them the heuristic's
    tiles with each code-unpacking mode (``UNPACK`` 0-3; their times get columns of their own, see
    ``_int4_moe_gemm_kernel.py``) and the FMA GEMV (``GEMV``, its own column and a grid of its tiles: one
    row per program on the unsorted small-batch launch, ``_int4_gemv_kernel.py``; BLOCK_SIZE_M rows per
    block on sorted launches, ``_int4_gemv_rows_kernel.py``); --tune-out DIR writes the
    winners as tuned-config files (op ``int4_moe_gemm``) that ``VLLM_TUNED_CONFIG_FOLDER=DIR`` or
    ``vllm/kernel_configs/tuned`` makes the kernel use.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

import benchmarks.kernels.benchmark_moe_lora as lb  # noqa: E402  (timing, reference, inputs: shared)
from benchmarks.kernels.int4_sweep import UNPACK_VARIANTS, sweep, write_tuned  # noqa: E402
from benchmarks.kernels.moe_dequant_paths import (DEQUANT_HEADER, INT4_TILES, add_lora_deltas_flag,  # noqa: E402
                                                  dequant_rows, on_path, paths_table, set_lora_deltas, set_path)

SHAPES = {k: lb.SHAPES[k] for k in ("qwen3", "mixtral")}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
QUICK_TOKENS = [1, 16, 256, 4096]
SMOKE_SHAPE = ("smoke", 64, 64, 8, 2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--symmetric", action="store_true", help="no zero points (GPTQ sym / compressed-tensors)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--reps", type=int, default=None, help="timed replays per case (default 100, --quick 30)")
    p.add_argument("--check-tokens", type=int, default=64)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, fewer replays")
    p.add_argument("--smoke", action="store_true", help="tiny shape; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--path", default="auto", choices=["auto", "kernel", "dequant"],
                   help="int4 experts path: the thresholds (auto), the in-register kernel, or dequantise + bf16 GEMM")
    p.add_argument("--compare-paths", action="store_true",
                   help="also time the base call on each forced path and report the crossover")
    p.add_argument("--sweep", action="store_true", help="time alternative tile configs of each int4 GEMM")
    p.add_argument("--tune-out", default=None, help="with --sweep: write the fastest configs here (JSON)")
    p.add_argument("--sweep-variants-only", action="store_true",
                   help="with --sweep: time only the heuristic's tiles with each UNPACK mode / stages and the GEMV "
                        "(the variant columns), not the tile grid")
    p.add_argument("--decode-unpack", type=int, default=None, choices=[3, 4, 5],
                   help="int4_moe_gemm.DECODE_UNPACK: the mode the heuristic gives the unsplit decode tiles of 32+ "
                        "rows (3: split by code position; 4 / 5: the operands swapped, 16-bit / tf32 dots)")
    p.add_argument("--pair-kernel", type=int, default=None, choices=[0, 1, 2],
                   help="fused_moe_lora.PAIR_KERNEL: the LoRA small-batch path's kernel (2: two launches)")
    add_lora_deltas_flag(p)
    return p.parse_args()


def dequant_stages(q_layer):
    """The two GEMMs' int4 weights, as ``moe_dequant_paths.dequant_rows`` takes them."""
    from vllm.model_executor.layers.fused_moe.ops.int4_dequant import dequantize_int4_experts

    qc = q_layer.quant_method.kernel.fused_experts.quant_config
    stages = []
    for label, w in (("w13", qc.w13), ("w2", qc.w2)):
        run = (lambda w: lambda out, e0, e1, bn, bk: dequantize_int4_experts(
            w, out, e0, e1, use_triton=True, block_n=bn, block_k=bk))(w)
        stages.append((label, w.num_experts, w.n, w.k, w.nbytes() // w.num_experts, run))
    return stages


class _BenchInt4Config:
    """The part of a QuantizationConfig that FusedMoE asks: the experts' quant method."""

    def __init__(self, group: int, has_zeros: bool) -> None:
        self.group, self.has_zeros = group, has_zeros

    def get_moe_method(self, moe_config, prefix):
        from vllm.model_executor.layers.fused_moe.int4_fused_moe_method import Int4MoEMethod

        return Int4MoEMethod(moe_config, self.group, self.has_zeros, act_order=False)


def _random_int4(out: int, inp: int, group: int, has_zeros: bool, device, gen):
    from vllm.model_executor.layers.quantization.int4 import Int4Weight

    G = inp // group
    q = torch.randint(0, 16, (out, inp), generator=gen, device=device, dtype=torch.uint8)
    scales = ((torch.rand(out, G, generator=gen, device=device) + 0.5) / (4 * inp ** 0.5)).half()
    zeros = torch.randint(6, 11, (out, G), generator=gen, device=device, dtype=torch.uint8) if has_zeros else None
    return Int4Weight(q, scales, zeros, group)


def build(shape, dtype, device, args, max_tokens: int):
    """(int4 layer, its LoRA wrapper, punica, adapters, bf16 layer with the dequantised weights)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

    name, H, I, E, k = shape
    gen = torch.Generator(device=device).manual_seed(args.seed)
    common = dict(params_dtype=dtype, device=device, activation="silu", renormalize=True, lora_enabled=True,
                  max_num_tokens=max(max_tokens, 8192))
    q_layer = FusedMoE(E, k, H, I, moe_backend="marlin", quant_config=_BenchInt4Config(args.group, not args.symmetric),
                       **common)
    f_layer = FusedMoE(E, k, H, I, moe_backend="triton", **common)
    for e in range(E):
        w1, w3 = (_random_int4(I, H, args.group, not args.symmetric, device, gen) for _ in range(2))
        w2 = _random_int4(H, I, args.group, not args.symmetric, device, gen)
        for shard, w in (("w1", w1), ("w3", w3), ("w2", w2)):
            q_layer.quant_method.load_int4(q_layer, shard, e, w)
        f_layer.w13_weight.data[e].copy_(torch.cat([w1.dequantize(dtype), w3.dequantize(dtype)]))
        f_layer.w2_weight.data[e].copy_(w2.dequantize(dtype))
    q_layer.process_weights_after_loading()
    f_layer.process_weights_after_loading()
    experts = type(q_layer.quant_method.kernel.fused_experts).__name__
    want = "MarlinExperts" if device.type == "cuda" or args.smoke else "TorchInt4Experts"
    if experts != want:
        sys.exit(f"expected {want}, the int4 layer runs {experts}")
    lora_layer = FusedMoEWithLoRA(q_layer)
    lora_layer.create_lora_weights(args.num_loras, LoRAConfig(max_loras=args.num_loras, max_lora_rank=args.rank))
    adapters = []
    R = args.rank
    for slot in range(args.num_loras):
        ad = lb.Adapter(w13_a=[lb._randn((E, R, H), H ** -0.5, dtype, device, gen) for _ in range(2)],
                        w13_b=[lb._randn((E, I, R), 0.5 * R ** -0.5, dtype, device, gen) for _ in range(2)],
                        w2_a=lb._randn((E, R, I), I ** -0.5, dtype, device, gen),
                        w2_b=lb._randn((E, H, R), 0.5 * R ** -0.5, dtype, device, gen))
        lora_layer.set_lora(slot, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
        adapters.append(ad)
    punica = get_punica_wrapper(max_tokens, args.num_loras, device, kind="gpu")
    lora_layer.set_mapping(punica)
    # the reference reads the dequantised weights from case.layer (the bf16 layer)
    case = lb.Case(name, H, I, E, k, f_layer, lora_layer, punica, adapters)
    return q_layer, case


def check(q_layer, case, M: int, args, dtype, device) -> str:
    """Both paths (the in-register kernel, dequantise + bf16 GEMM) against the fp32 reference."""
    out = "; ".join(f"{path}: {check_path(q_layer, case, M, args, dtype, device, path)}"
                    for path in ("kernel", "dequant"))
    set_path(args.path)
    return out


def check_path(q_layer, case, M: int, args, dtype, device, path: str) -> str:
    set_path(path)
    x, logits, tw, ti, slots = lb.make_inputs(case, M, args.num_loras, dtype, device, args.seed)
    case.punica.update_metadata(slots)
    qm, ctx = q_layer.quant_method, q_layer._lora_context
    ref_lora = lb.reference(case, x, tw, ti, slots, True)
    ref_base = lb.reference(case, x, tw, ti, slots, False)
    errs = {"int4 LoRA forward": lb.norm_err(case.lora_layer(x, logits), ref_lora),
            "int4 LoRA experts call": lb.norm_err(qm.apply(q_layer, x, tw, ti, lora_context=ctx), ref_lora),
            "int4 base call": lb.norm_err(qm.apply(q_layer, x, tw, ti, lora_context=None), ref_base),
            "bf16 base call": lb.norm_err(case.layer.quant_method.apply(case.layer, x, tw, ti), ref_base)}
    delta = lb.norm_err(ref_base, ref_lora)
    tol = lb.TOLERANCE[dtype]
    bad = {n: e for n, e in errs.items() if not e < tol}
    if bad or delta < 10 * tol:
        sys.exit(f"CORRECTNESS FAILED for {case.name} at {M} tokens, {path} path: normalised max errors {errs} "
                 f"(tolerance {tol}); LoRA effect {delta:.3f}")
    return ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tol {tol:.0e}; LoRA effect {delta:.2f})"


def int4_bytes_per_expert(layer) -> int:
    names = [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]
    kept = [getattr(layer, n) for n in names if 0 not in getattr(layer, n).stride()]  # not the shape-only views
    total = sum(t.numel() * t.element_size() for t in kept)
    return total // layer.local_num_experts


def bench(q_layer, case, M: int, args, dtype, device, flush, gpu: str, peak: float) -> dict:
    x, _, tw, ti, slots = lb.make_inputs(case, M, args.num_loras, dtype, device, args.seed)
    case.punica.update_metadata(slots)
    qm, ctx, f_layer = q_layer.quant_method, q_layer._lora_context, case.layer
    base = lambda: qm.apply(q_layer, x, tw, ti, lora_context=None)  # noqa: E731
    fns = {"bf16": lambda: f_layer.quant_method.apply(f_layer, x, tw, ti, lora_context=None),
           "int4": on_path(args.path, base),
           "int4_lora": on_path(args.path, lambda: qm.apply(q_layer, x, tw, ti, lora_context=ctx))}
    if args.compare_paths:
        fns.update(kernel=on_path("kernel", base), dequant=on_path("dequant", base))
    t, graphs, notes = {}, [], []
    for key, fn in fns.items():  # (each int4 fn sets its path: the order does not matter)
        if device.type == "cuda":
            t[key], g, n = lb.time_cuda(fn, flush, args.reps, not args.no_graph)
        else:
            t[key], g, n = lb.time_cpu(fn, args.reps)
        graphs.append(g)
        if n:
            notes.append(f"{key}: {n}")
    D = int(torch.unique(ti).numel())
    pairs = int(torch.unique(slots.to(ti.device).long()[:, None] * case.E + ti.long()).numel())
    b_base = D * int4_bytes_per_expert(q_layer)
    b_lora = pairs * 3 * args.rank * (case.H + case.I) * torch.finfo(dtype).bits // 8
    return dict(shape=case.name, tokens=M, experts=D, bf16=t["bf16"], int4=t["int4"], lora=t["int4_lora"],
                speedup=t["bf16"] / t["int4"], ratio=t["int4_lora"] / t["int4"],
                gbs=b_base / (t["int4"] * 1e-6) / 1e9, roof=100 * (b_base / peak * 1e6) / t["int4"],
                roof_lora=100 * ((b_base + b_lora) / peak * 1e6) / t["int4_lora"],
                graph="yes" if all(graphs) else "no", gpu=gpu, notes=notes, pairs_per_expert=M * case.k / case.E,
                kernel=t.get("kernel"), dequant=t.get("dequant"))


def _mark(ok: bool) -> str:
    return "" if ok else " (!)"


def table(rows: list[dict]) -> str:
    lines = ["| shape | tokens | experts | bf16 Triton (us) | int4 Marlin (us) | bf16 / int4 | int4 + LoRA (us) "
             "| LoRA / base | int4 GB/s | % of roofline (base / LoRA) | graph | GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        speed_ok = r["speedup"] >= 2.5 if r["tokens"] <= 16 else (r["speedup"] >= 1.0 if r["tokens"] == 256 else True)
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['experts']} | {r['bf16']:.1f} | {r['int4']:.1f} "
                     f"| {r['speedup']:.2f}{_mark(speed_ok)} | {r['lora']:.1f} | {r['ratio']:.2f}{_mark(r['ratio'] <= 1.15)} "
                     f"| {r['gbs']:.4g} | {r['roof']:.0f} % / {r['roof_lora']:.0f} % | {r['graph']} | {r['gpu']} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.sweep or args.compare_paths:  # these time the Triton kernels and their dequantiser on their own words
        os.environ["VLLM_INT4_MMA"] = "0"
        print("--sweep / --compare-paths: VLLM_INT4_MMA=0 (the Triton layout's words are kept)", flush=True)
    device = lb.pick_device(args.smoke)
    has_cuda = device.type == "cuda"
    dtype = lb.DTYPES[args.dtype]
    if args.smoke:
        shapes, tokens, args.group = [SMOKE_SHAPE], args.tokens or [1, 7], min(args.group, 32)
        dtype = torch.float16 if not has_cuda else dtype  # the interpreter's bf16 is not the GPU's
    else:
        shapes = [SHAPES[s] for s in args.shapes]
        tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    args.reps = args.reps or (2 if not has_cuda else 30 if args.quick else 100)
    check_m = min(args.check_tokens, 7) if args.smoke else args.check_tokens
    gpu = torch.cuda.get_device_name(device) if has_cuda else "cpu (interpreter)"
    torch.manual_seed(args.seed)
    peak = lb.peak_bandwidth(device)
    set_path(args.path)
    if args.decode_unpack is not None:
        import vllm.model_executor.layers.fused_moe.ops.int4_moe_gemm as int4_gemm

        int4_gemm.DECODE_UNPACK = args.decode_unpack
    set_lora_deltas(args.lora_deltas, "marlin_experts", "MarlinExperts")
    if args.pair_kernel is not None:
        from vllm.lora.ops.triton_ops import fused_moe_lora

        fused_moe_lora.PAIR_KERNEL = args.pair_kernel
    print(f"device: {gpu}; {str(dtype).replace('torch.', '')} activations; int4 group {args.group}, "
          f"{'symmetric' if args.symmetric else 'zero points'}; LoRA rank {args.rank}, {args.num_loras} adapters; "
          f"copy bandwidth peak (read + write) {peak / 1e9:.0f} GB/s; experts path {args.path}", flush=True)
    flush = torch.empty(lb.FLUSH_BYTES // 4, dtype=torch.float32, device=device) if has_cuda else None
    rows, notes, sweep_lines, tuned, dq_lines = [], [], [], {}, []
    for shape in shapes:
        q_layer, case = build(shape, dtype, device, args, max(max(tokens), check_m))
        print(f"[{case.name}] H={case.H} I={case.I} E={case.E} top_k={case.k}: correctness at {check_m} tokens: "
              f"{check(q_layer, case, check_m, args, dtype, device)}", flush=True)
        for M in tokens:
            r = bench(q_layer, case, M, args, dtype, device, flush, gpu, peak)
            notes += [f"{case.name} {M} tokens: {n}" for n in r["notes"]]
            print(f"  {M:5d} tokens: bf16 {r['bf16']:8.1f} us  int4 {r['int4']:8.1f} us  x{r['speedup']:.2f}  "
                  f"int4+LoRA {r['lora']:8.1f} us  ratio {r['ratio']:.2f}  {r['roof']:3.0f} % of roofline"
                  + (f"  kernel {r['kernel']:.1f} / dequant {r['dequant']:.1f} us" if args.compare_paths else ""),
                  flush=True)
            rows.append(r)
        if args.compare_paths:
            timer = ((lambda fn: lb.time_cuda(fn, flush, args.reps, not args.no_graph)[0]) if has_cuda
                     else (lambda fn: lb.time_cpu(fn, 1)[0]))
            dq_lines += dequant_rows(case.name, dequant_stages(q_layer), INT4_TILES, dtype, device, timer, peak)
        if args.sweep:
            sweep_lines += sweep(q_layer, case, tokens, args, dtype, device, flush, tuned)
        del q_layer, case
        if has_cuda:
            torch.cuda.empty_cache()
    text = "\n".join([
        f"## int4 (W4A16, group {args.group}) MoE layer vs bf16: {gpu}, {args.dtype}, LoRA rank {args.rank}, "
        f"{args.num_loras} adapters, experts path {args.path}", "", table(rows), "",
        "Notes:",
        "- Timed: `quant_method.apply(...)` with routing precomputed (align/sort, both GEMMs, activation, top-k sum, "
        "LoRA when on). (!) marks a missed target: >= 2.5x at 1-16 tokens, >= 1x at 256, LoRA / base <= 1.15.",
        "- Bytes: packed int4 weights + scales + zeros of the routed experts (+ the routed LoRA weights for the LoRA "
        f"column); peak {peak / 1e9:.0f} GB/s from a large device copy.",
        *[f"- {n}" for n in notes], ""])
    if args.compare_paths:
        text += "\n".join(["", "### int4 experts paths: in-register kernel vs dequantise + bf16 GEMM (base call)", "",
                           paths_table(rows, "int4", "bf16 Triton"), "", "The int4 dequantiser alone (one scratch of experts):", "",
                           *DEQUANT_HEADER,
                           *dq_lines, ""])
    if sweep_lines:
        text += "\n".join(["", "### int4 GEMM tiles: heuristic vs its unpacking modes and the GEMV vs the fastest swept", "",
                           "| shape | tokens | GEMM | routing | heuristic (us) |"
                           + "".join(f" heuristic + {n} (us) |" for n in UNPACK_VARIANTS)
                           + " best (us) | speed-up | best config |",
                           "|---|---:|---|---|---:|" + "---:|" * len(UNPACK_VARIANTS) + "---:|---:|---|", *sweep_lines,
                           ""])
        if args.tune_out:
            write_tuned(tuned, args.tune_out)
    lb.emit(text, args.out)


if __name__ == "__main__":
    main()
