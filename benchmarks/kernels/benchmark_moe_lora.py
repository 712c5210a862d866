"""Benchmark of one fused-MoE layer's experts, without and with multi-LoRA, and a baseline.

What is timed: ``layer.quant_method.apply(layer, x, topk_weights, topk_ids,
lora_context=...)`` of a ``FusedMoE`` built with ``lora_enabled=True`` (backend
TritonExperts) and wrapped by ``FusedMoEWithLoRA`` (Punica wrapper: Triton).
  base = the call with ``lora_context=None``; LoRA = with the layer's context;
  baseline = with the same context but the LoRA as separate shrink and expand
  launches after each base GEMM (``moe_lora_baseline.py``, issue 11).
Per shape, every ``--ranks`` x ``--num-loras`` combination is a row (the base time
is measured once per shape and token count).
Routing (random logits -> fused_topk) is precomputed; the token -> adapter
mapping is written once with ``update_metadata`` before capture (its buffer is
static).  The timed region therefore contains: the expert sort/align, GEMM1, the
LoRA align + w13 LoRA, the activation, GEMM2, the w2 LoRA, the top-k sum and the
output allocation.  (Upstream's FACTS.md 5 figures exclude align/act/sum.)

How (CUDA): each op is warmed up, captured in a ``torch.cuda.CUDAGraph`` and
replayed; before every timed replay a 256 MB buffer is written to flush the L2,
and CUDA events bracket the replay alone.  The median over ``--reps`` replays is
reported.  If capture fails, the op is timed eagerly the same way ("graph"
column: no).  Bandwidth peak: a 1 GiB device-to-device copy (read + write).
Bytes (FACTS.md 6): base = D * 3HI * 2 (D = distinct experts actually routed),
LoRA = pairs * 3R(H+I) * 2 (pairs = distinct (adapter, expert) pairs actually
routed; ``--w13-layout fused``: pairs * (2R(H+2I) + R(I+H)) * 2); "% roofline" =
((base + LoRA bytes) / peak) / LoRA time.

Correctness first, per shape and combination: the LoRA layer (forward and the
timed call), the baseline call and the base call are compared with an fp32 torch
computation written here;
normalised max error max|a-b|/max|b| must be below the dtype's tolerance.

``--smoke`` runs tiny shapes; without CUDA it sets TRITON_INTERPRET=1 and times
wall-clock on the CPU (no graphs), just to exercise the code path.

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_lora.py [--shapes qwen3 mixtral gpt-oss]
        [--tokens 1 16 64 256 1024 4096] [--ranks 16 64] [--num-loras 4 16] [--dtype bf16] [--out table.md]
        [--shrink-split-k N]    (the MoE LoRA split-K variant forced on the fused ops: moe_lora_variants.py)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)
# the timing helpers, also imported from here by the other kernel benchmarks
from benchmarks.kernels.bench_timing import (  # noqa: E402,F401
    FLUSH_BYTES,
    emit,
    norm_err,
    peak_bandwidth,
    pick_device,
    time_cpu,
    time_cuda,
)

# name -> (hidden H, intermediate I, experts E, top_k), FACTS.md 1 (gpt-oss shape with plain SiLU experts)
SHAPES = {"qwen3": ("Qwen3-30B-A3B", 2048, 768, 128, 8), "mixtral": ("Mixtral-8x7B", 4096, 14336, 8, 2),
          "gpt-oss": ("gpt-oss-20b shape (SiLU)", 2880, 2880, 32, 4)}
SMOKE_SHAPE = ("smoke", 64, 64, 8, 2)
TOKENS = [1, 16, 64, 256, 1024, 4096]
SMOKE_TOKENS = [1, 7, 33]
# FACTS.md 5: upstream vLLM MoE+LoRA / base time on an H200 (align, activation, sum not timed).
UPSTREAM_TOKENS = [1, 16, 64, 256, 1024, 4096]
UPSTREAM = {"qwen3": [2.21, 1.28, 1.28, 1.34, 1.77, 1.52], "mixtral": [2.15, 1.27, 1.31, 1.73, 1.40, 1.13],
            "gpt-oss": [1.96, 1.25, 1.27, 1.42, 1.38, 1.36]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--ranks", "--rank", nargs="+", type=int, default=[16], dest="ranks", help="LoRA ranks")
    p.add_argument("--num-loras", nargs="+", type=int, default=[4], help="adapters (tokens round-robin)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=None, help="timed replays per case (default 100; smoke on CPU: 2)")
    p.add_argument("--check-tokens", type=int, default=64, help="token count of the correctness check")
    p.add_argument("--no-graph", action="store_true", help="time eagerly, without CUDA graphs")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    p.add_argument("--w13-layout", default="slices", choices=["slices", "peft", "fused"],
                   help="peft: the engine's layer with peft's fused gate_up adapters (two slices of the rank, one "
                        "A: fused_moe.SHARE_W13_A); fused: one w13 slice of 2I rows at twice the rank "
                        "(FusedMoE3DWithLoRA holding gate and up adapters side by side); default: two slices with "
                        "per-expert adapters (gate and up A differ)")
    p.add_argument("--shrink-split-k", type=int, default=None,
                   help="force the MoE LoRA split-K variant (SHRINK_SPLIT_K=N; expand: one N tile per program, "
                        "one stage) on the fused ops' sorted path")
    from benchmarks.kernels.moe_lora_variants import add_switch_flags

    add_switch_flags(p)  # the path choice's and kernels' module switches: --pair-kernel, --pair-path-factor, ...
    return p.parse_args()


@dataclass
class Adapter:
    """One adapter over all experts (scaling folded into B): w13 as [gate, up] slices, or one fused slice."""
    w13_a: list  # 2 x [E, R, H] (fused: 1 x [E, 2R, H])
    w13_b: list  # 2 x [E, I, R] (fused: 1 x [E, 2I, 2R])
    w2_a: torch.Tensor  # [E, R, I]
    w2_b: torch.Tensor  # [E, H, R]


@dataclass
class Case:
    """A LoRA-wrapped MoE layer with its adapters and Punica wrapper."""
    name: str
    H: int
    I: int
    E: int
    k: int
    layer: object  # FusedMoE (experts: TritonExperts)
    lora_layer: object  # FusedMoEWithLoRA
    punica: object
    adapters: list
    baseline: object = None  # (LoRA context, Punica wrapper) of the separate shrink/expand baseline

    def set_mapping(self, slots: torch.Tensor) -> None:
        """The step's token -> slot mapping, for the layer's wrapper and the baseline's."""
        for p in (self.punica, self.baseline[1] if self.baseline else None):
            if p is not None:
                p.update_metadata(slots)


def _randn(shape, std, dtype, device, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)


def build_case(shape, dtype, device, rank, num_loras, max_tokens, seed, layer=None, w13_layout: str = "slices") -> Case:
    """The layer (random weights; or ``layer``, a base layer built before) with ``num_loras`` adapters.

    w13_layout "slices": gate and up adapters of rank ``rank`` (``FusedMoEWithLoRA``, two w13 slices: the engine's
    layer for these shapes, with per-expert adapters: gate and up A differ); "peft": the same layer with peft's
    fused gate_up adapters (one A and a B of 2I rows, stored as two slices reading one A); "fused":
    ``FusedMoE3DWithLoRA``, one w13 slice of 2I rows at rank 2 x ``rank`` (gate
    and up adapters side by side, block-diagonal B) and w2 at ``rank``."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

    name, H, I, E, k = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    if layer is None:
        layer = FusedMoE(E, k, H, I, params_dtype=dtype, device=device, activation="silu", renormalize=True,
                         moe_backend="triton", lora_enabled=True, max_num_tokens=max(max_tokens, 8192))
        for e in range(E):  # per expert: no full-size fp32 temporaries
            layer.w13_weight.data[e].copy_(_randn((2 * I, H), H ** -0.5, dtype, device, gen))
            layer.w2_weight.data[e].copy_(_randn((H, I), I ** -0.5, dtype, device, gen))
        layer.process_weights_after_loading()
    fused = w13_layout == "fused"
    r13, n13, rows13 = (2 * rank, 1, 2 * I) if fused else (rank, 1, 2 * I) if w13_layout == "peft" else (rank, 2, I)
    lora_layer = (FusedMoE3DWithLoRA if fused else FusedMoEWithLoRA)(layer)
    lora_layer.create_lora_weights(num_loras, LoRAConfig(max_loras=num_loras, max_lora_rank=r13))
    adapters = []
    for slot in range(num_loras):  # random, non-zero, different per slot
        ad = Adapter(w13_a=[_randn((E, r13, H), H ** -0.5, dtype, device, gen) for _ in range(n13)],
                     w13_b=[_randn((E, rows13, r13), 0.5 * r13 ** -0.5, dtype, device, gen) for _ in range(n13)],
                     w2_a=_randn((E, rank, I), I ** -0.5, dtype, device, gen),
                     w2_b=_randn((E, H, rank), 0.5 * rank ** -0.5, dtype, device, gen))
        lora_layer.set_lora(slot, w13_lora_a=ad.w13_a, w13_lora_b=ad.w13_b, w2_lora_a=ad.w2_a, w2_lora_b=ad.w2_b)
        adapters.append(ad)
    punica = get_punica_wrapper(max_tokens, num_loras, device, kind="gpu")
    lora_layer.set_mapping(punica)
    if type(layer.quant_method.kernel.fused_experts).__name__ != "TritonExperts":
        sys.exit(f"expected TritonExperts, the layer runs {type(layer.quant_method.kernel.fused_experts).__name__}")
    from benchmarks.kernels.moe_lora_baseline import baseline_context

    if fused:
        name = f"{name}, fused w13 at rank {r13}"
    elif w13_layout == "peft":
        name = f"{name}, peft fused gate_up (one A)"
    return Case(name, H, I, E, k, layer, lora_layer, punica, adapters, baseline_context(layer, punica))


def make_inputs(case: Case, M: int, num_loras: int, dtype, device, seed: int):
    """x [M, H], router logits, precomputed routing, and the round-robin slot of each token."""
    from vllm.model_executor.layers.fused_moe.router import fused_topk

    gen = torch.Generator(device=device).manual_seed(seed + M)
    x = torch.randn(M, case.H, generator=gen, device=device).to(dtype)
    logits = torch.randn(M, case.E, generator=gen, device=device)
    tw, ti = fused_topk(logits, case.k, renormalize=True)
    slots = torch.arange(M, dtype=torch.int32) % num_loras  # token t -> slot t % num_loras
    return x, logits, tw, ti, slots


def reference(case: Case, x, tw, ti, slots, with_lora: bool) -> torch.Tensor:
    """fp32 MoE (+ per-token LoRA) from the same (rounded) weights, looping over experts and slots."""
    M, H = x.shape
    I, k = case.I, case.k
    w13, w2 = case.layer.w13_weight, case.layer.w2_weight
    xf = x.float()
    experts = ti.reshape(-1).long()
    token = torch.arange(M * k, device=x.device) // k
    weight = tw.reshape(-1).float()
    slot_p = slots.to(x.device).long()[token]
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():
        p = (experts == e).nonzero().squeeze(1)
        xe = xf[token[p]]
        h = xe @ w13[e].float().T  # [n, 2I]: gate | up
        masks = [(s, slot_p[p] == s) for s in range(len(case.adapters))] if with_lora else []
        for s, m in masks:
            ad = case.adapters[s]
            h[m] += torch.cat([(xe[m] @ a[e].float().T) @ b[e].float().T for a, b in zip(ad.w13_a, ad.w13_b)], 1)
        act = F.silu(h[:, :I]) * h[:, I:]
        y = act @ w2[e].float().T
        for s, m in masks:
            ad = case.adapters[s]
            y[m] += (act[m] @ ad.w2_a[e].float().T) @ ad.w2_b[e].float().T
        out.index_add_(0, token[p], y * weight[p, None])
    return out


def check(case: Case, M: int, num_loras: int, dtype, device, seed: int) -> str:
    x, logits, tw, ti, slots = make_inputs(case, M, num_loras, dtype, device, seed)
    case.set_mapping(slots)
    qm, ctx = case.layer.quant_method, case.layer._lora_context
    ref_lora = reference(case, x, tw, ti, slots, True)
    ref_base = reference(case, x, tw, ti, slots, False)
    errs = {"LoRA forward": norm_err(case.lora_layer(x, logits), ref_lora),
            "LoRA experts call": norm_err(qm.apply(case.layer, x, tw, ti, lora_context=ctx), ref_lora),
            "baseline call": norm_err(qm.apply(case.layer, x, tw, ti, lora_context=case.baseline[0]), ref_lora),
            "base experts call": norm_err(qm.apply(case.layer, x, tw, ti, lora_context=None), ref_base)}
    delta = norm_err(ref_base, ref_lora)  # LoRA must change the output, or the check proves nothing
    tol = TOLERANCE[dtype]
    bad = {n: e for n, e in errs.items() if not e < tol}
    if bad or delta < 10 * tol:
        sys.exit(f"CORRECTNESS FAILED for {case.name} at {M} tokens, {num_loras} adapters: normalised max errors {errs} "
                 f"(tolerance {tol}); LoRA effect {delta:.3f}")
    return ", ".join(f"{n} {e:.2e}" for n, e in errs.items()) + f" (tol {tol:.0e}; LoRA effect {delta:.2f})"


def traffic(case: Case, ti, slots, rank: int) -> tuple[int, int, int, int]:
    """(distinct experts, distinct (adapter, expert) pairs, base bytes, LoRA bytes) of this routing."""
    D = int(torch.unique(ti).numel())
    vids = slots.to(ti.device).long()[:, None] * case.E + ti.long()
    pairs = int(torch.unique(vids).numel())
    elt = case.layer.w13_weight.element_size()
    # per (adapter, expert): w13's A and B as the adapter holds them (two slices, or one fused at twice the
    # rank), and w2's A [R, I] and B [H, R]
    w13 = sum(a[0].numel() + b[0].numel() for a, b in zip(case.adapters[0].w13_a, case.adapters[0].w13_b))
    return D, pairs, D * 3 * case.H * case.I * elt, pairs * (w13 + rank * (case.H + case.I)) * elt


def bench_case(case: Case, M: int, args, dtype, device, flush, gpu: str, peak: float, rank: int,
               num_loras: int, base: Optional[tuple[float, bool, str]] = None) -> dict:
    """Times of one row; ``base``: the base call's (time, graph, note) measured for another combination."""
    x, _, tw, ti, slots = make_inputs(case, M, num_loras, dtype, device, args.seed)
    case.set_mapping(slots)  # outside any graph: the mapping buffers are static
    qm, layer, ctx = case.layer.quant_method, case.layer, case.layer._lora_context
    fns = {"base": lambda: qm.apply(layer, x, tw, ti, lora_context=None),
           "lora": lambda: qm.apply(layer, x, tw, ti, lora_context=ctx),
           "baseline": lambda: qm.apply(layer, x, tw, ti, lora_context=case.baseline[0])}
    t = {"base": base} if base is not None else {}
    for key, fn in fns.items():
        if key not in t:
            t[key] = (time_cuda(fn, flush, args.reps, not args.no_graph) if device.type == "cuda"
                      else time_cpu(fn, args.reps))
    (t_base, _, _), (t_lora, _, _), (t_bl, _, _) = t["base"], t["lora"], t["baseline"]
    D, pairs, b_base, b_lora = traffic(case, ti, slots, rank)
    min_us = (b_base + b_lora) / peak * 1e6
    return dict(shape=case.name, tokens=M, rank=rank, loras=num_loras, experts=D, pairs=pairs, base=t_base,
                lora=t_lora, ratio=t_lora / t_base, baseline=t_bl, bl_ratio=t_bl / t_base,
                gbs=(b_base + b_lora) / (t_lora * 1e-6) / 1e9, roof=100 * min_us / t_lora, min_us=min_us,
                graph=("yes" if all(v[1] for v in t.values()) else "no"), gpu=gpu, base_timing=t["base"],
                notes=[f"{k}: {v[2]}" for k, v in t.items() if v[2]])


def results_table(rows: list[dict]) -> str:
    head = ("| shape | tokens | rank | adapters | experts | (adapter, expert) pairs | base (us) | LoRA (us) | ratio "
            "| baseline LoRA (us) | baseline ratio | ours / baseline | GB/s | min with LoRA (us) | % of roofline "
            "| graph | GPU |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['rank']} | {r['loras']} | {r['experts']} | {r['pairs']} "
                     f"| {r['base']:.1f} | {r['lora']:.1f} | {r['ratio']:.2f} | {r['baseline']:.1f} "
                     f"| {r['bl_ratio']:.2f} | {r['lora'] / r['baseline']:.2f} | {r['gbs']:.4g} | {r['min_us']:.1f} "
                     f"| {r['roof']:.0f} % | {r['graph']} | {r['gpu']} |")
    return "\n".join(lines)


def upstream_table(rows: list[dict], keys: list[str]) -> str:
    """Our LoRA/base ratio (rank 16, 4 adapters) beside upstream vLLM's H200 figures (FACTS.md 5)."""
    lines = ["| shape | " + " | ".join(f"{t} tokens (ours / upstream H200)" for t in UPSTREAM_TOKENS) + " |",
             "|---|" + "---:|" * len(UPSTREAM_TOKENS)]
    for key in keys:
        if key not in UPSTREAM:
            continue
        ours = {r["tokens"]: r["ratio"] for r in rows
                if r["shape"] == SHAPES[key][0] and (r["rank"], r["loras"]) == (16, 4)}
        cells = [(f"{ours[t]:.2f}" if t in ours else "-") + f" / {u:.2f}" for t, u in zip(UPSTREAM_TOKENS, UPSTREAM[key])]
        lines.append(f"| {SHAPES[key][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device = pick_device(args.smoke)
    has_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    shapes = [SMOKE_SHAPE] if args.smoke else [SHAPES[s] for s in args.shapes]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    check_m = min(args.check_tokens, 33) if args.smoke else args.check_tokens
    args.reps = args.reps or (100 if has_cuda else 2)
    gpu = torch.cuda.get_device_name(device) if has_cuda else "cpu (interpreter)"
    torch.manual_seed(args.seed)
    if args.shrink_split_k is not None:
        from benchmarks.kernels.moe_lora_variants import force_shrink_split_k

        force_shrink_split_k(args.shrink_split_k)
    from benchmarks.kernels.moe_lora_variants import apply_switch_flags

    switches = apply_switch_flags(args)
    peak = peak_bandwidth(device)
    print(f"device: {gpu}; dtype {args.dtype}; ranks {args.ranks}; adapters {args.num_loras}, tokens round-robin; "
          f"measured copy bandwidth peak (read + write): {peak / 1e9:.0f} GB/s")
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if has_cuda else None
    rows, notes = [], []
    for shape in shapes:
        layer, base_timings = None, {}  # one base layer per shape; its time once per token count
        for rank, num_loras in itertools.product(args.ranks, args.num_loras):
            case = build_case(shape, dtype, device, rank, num_loras, max(max(tokens), check_m), args.seed, layer=layer,
                              w13_layout=args.w13_layout)
            layer = case.layer
            ok = check(case, check_m, num_loras, dtype, device, args.seed)
            print(f"[{case.name}] H={case.H} I={case.I} E={case.E} top_k={case.k} rank {rank}, {num_loras} adapters: "
                  f"correctness at {check_m} tokens: {ok}", flush=True)
            for M in tokens:
                r = bench_case(case, M, args, dtype, device, flush, gpu, peak, rank, num_loras, base=base_timings.get(M))
                base_timings[M] = r["base_timing"]
                notes += [f"{case.name} {M} tokens R={rank} L={num_loras}: {n}" for n in r["notes"]]
                print(f"  {M:5d} tokens R={rank:3d} L={num_loras:2d}: base {r['base']:9.1f} us  LoRA {r['lora']:9.1f} us  "
                      f"ratio {r['ratio']:.2f}  baseline {r['baseline']:9.1f} us ({r['bl_ratio']:.2f})  "
                      f"{r['gbs']:6.0f} GB/s  {r['roof']:3.0f} % of roofline  graph {r['graph']}", flush=True)
                rows.append(r)
            del case
        del layer
        if has_cuda:
            torch.cuda.empty_cache()

    text = "\n".join([
        f"## MoE experts with multi-LoRA: {gpu}, {args.dtype}, ranks {args.ranks}, adapters {args.num_loras}"
        + (f", SHRINK_SPLIT_K={args.shrink_split_k} forced" if args.shrink_split_k is not None else "")
        + "".join(f", {sw}" for sw in switches),
        "",
        results_table(rows), "",
        "Notes:",
        "- Timed: `quant_method.apply(layer, x, topk_weights, topk_ids, lora_context=...)` with routing precomputed; "
        "the region INCLUDES the expert align/sort, the LoRA (adapter, expert) align, the activation, the top-k sum "
        "and the output allocation (upstream's FACTS.md 5 figures exclude align, activation and sum).",
        "- Baseline: the same call, the LoRA as separate shrink and expand launches after each base GEMM "
        "(`benchmarks/kernels/moe_lora_baseline.py`); ours / baseline = LoRA time / baseline LoRA time.",
        "- CUDA: graph replay (unless graph = no), L2 flushed (256 MB write) before each replay, events around the "
        f"replay only, median of {args.reps}. CPU smoke: wall clock of the Triton interpreter, meaningless as speed.",
        f"- Bytes = weights only (FACTS.md 6): D*3HI*2 + pairs*3R(H+I)*2; peak = {peak / 1e9:.0f} GB/s from a large "
        "device copy; min time = bytes / peak; % of roofline = min time / LoRA time.",
        *[f"- {n}" for n in notes],
        *(["- WARNING: rows with graph = no were timed eagerly: the ~40 small launches of the LoRA path make them "
           "CPU-launch bound, so they do not measure the GPU work."] if has_cuda and notes else []), ""])
    if not args.smoke:
        text += "\n".join(["", "### LoRA / base time ratio, ours vs upstream vLLM (upstream: FACTS.md 5, measured "
                            "on an H200; their timed region excluded align/activation/sum)", "",
                            upstream_table(rows, args.shapes), ""])
    emit(text, args.out)


if __name__ == "__main__":
    main()
