"""A/B of the bf16 MoE GEMV at decode: one MoE layer with the FMA GEMV on pairwise launches vs the tl.dot kernel.

What is timed: ``layer.quant_method.apply(layer, x, topk_weights, topk_ids)`` of a ``FusedMoE`` (TritonExperts,
random weights, ``--bias``: random expert biases too) with precomputed routing, i.e. the whole layer at 1, 2 and 4
tokens: alignment, both GEMMs, activation, top-k sum.  Once with ``fused_moe_gemm.GEMV_PAIRWISE`` on (pairwise
launches, one pair per block among many experts, run ``_fused_moe_gemv_kernel.py``) and once off (the tl.dot
kernel with its tuned / heuristic tiles); CUDA-graph replay, L2 flushed before each replay, median of ``--reps``
(the timing helpers of ``benchmark_moe_lora.py``).  Where the routing is sorted (not pairwise: e.g. Mixtral-8x7B
at 2+ tokens) both runs are the same kernels ("GEMV applies: no").

Correctness first: for each token count both runs are compared with an fp32 loop over the routed experts
(``reference``), and the run with the GEMV on must have launched it.

Bytes: the distinct routed experts' w13 + w2 (+ biases); "% of roofline" = (bytes / copy bandwidth) / time, the
copy bandwidth measured here (read + write of a large copy).

``--sweep``: per shape, pairwise token count and GEMM, the GEMM alone (``invoke_fused_moe_gemm`` on the pairwise
alignment) with the dot kernel's config, the GEMV heuristic's and a small grid of GEMV tiles (BLOCK_SIZE_N,
BLOCK_SIZE_K, warps, SPLIT_K), each checked against the dot kernel's output first; prints the fastest as a tuned
entry (op ``fused_moe_gemm``, ``"GEMV": 1``).

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_gemv.py [--shapes qwen3 mixtral gpt-oss] [--tokens 1 2 4]
        [--bias] [--sweep] [--reps 100] [--out table.md]
    --smoke: a tiny shape on CPU under TRITON_INTERPRET=1 (exercises the code path only).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

import benchmarks.kernels.benchmark_moe_lora as lb  # noqa: E402  (shapes, timing, inputs: shared)
from benchmarks.kernels.bench_timing import add_run_args  # noqa: E402

SMOKE_SHAPE = ("smoke", 64, 64, 16, 2)  # 1 and 2 tokens pairwise, 4 tokens sorted
SWEEP_N, SWEEP_K, SWEEP_WARPS, SWEEP_SPLITS = (8, 16, 32, 64), (256, 512, 1024), (2, 8), (2, 4)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(lb.SHAPES), choices=list(lb.SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--bias", action="store_true", help="random expert biases (gpt-oss has them)")
    p.add_argument("--sweep", action="store_true", help="also time each GEMM alone over a grid of GEMV tiles")
    add_run_args(p, smoke="tiny shape")
    return p.parse_args()


def build(shape, dtype, device, bias: bool, seed: int):
    """A FusedMoE layer (TritonExperts) with random weights (and biases)."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

    _, H, I, E, k = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = FusedMoE(E, k, H, I, params_dtype=dtype, device=device, activation="silu", renormalize=True,
                     moe_backend="triton", has_bias=bias, max_num_tokens=64)
    for e in range(E):  # per expert: no full-size fp32 temporaries
        layer.w13_weight.data[e].copy_(lb._randn((2 * I, H), H ** -0.5, dtype, device, gen))
        layer.w2_weight.data[e].copy_(lb._randn((H, I), I ** -0.5, dtype, device, gen))
    if bias:
        layer.w13_bias.data.copy_(lb._randn(tuple(layer.w13_bias.shape), 0.1, dtype, device, gen))
        layer.w2_bias.data.copy_(lb._randn(tuple(layer.w2_bias.shape), 0.1, dtype, device, gen))
    layer.process_weights_after_loading()
    experts = type(layer.quant_method.kernel.fused_experts).__name__
    if experts != "TritonExperts":
        sys.exit(f"expected TritonExperts, the layer runs {experts}")
    return layer


def reference(layer, x, tw, ti) -> torch.Tensor:
    """fp32 loop over the routed experts: sum_j w_j (W2[e] silu-and-mul(W13[e] x + b13[e]) + b2[e])."""
    M, H = x.shape
    k, I = ti.shape[1], layer.w2_weight.shape[2]
    b13, b2 = getattr(layer, "w13_bias", None), getattr(layer, "w2_bias", None)
    experts, token = ti.reshape(-1).long(), torch.arange(M * k, device=x.device) // k
    weight = tw.reshape(-1).float()
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    for e in torch.unique(experts).tolist():
        p = (experts == e).nonzero().squeeze(1)
        h = x[token[p]].float() @ layer.w13_weight[e].float().T + (b13[e].float() if b13 is not None else 0)
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ layer.w2_weight[e].float().T
        y = y + (b2[e].float() if b2 is not None else 0)
        out.index_add_(0, token[p], y * weight[p, None])
    return out


def gemv_switch(on: bool) -> bool:
    """``fused_moe_gemm.GEMV_PAIRWISE`` set to ``on`` (configs are cached per value: no cache to clear); returns
    the value it had."""
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    was, fused_moe_gemm.GEMV_PAIRWISE = fused_moe_gemm.GEMV_PAIRWISE, on
    return was


def count_gemv_launches(fn) -> int:
    """Runs fn once; how many times it launched the GEMV."""
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    real, calls = fused_moe_gemm.invoke_fused_moe_gemv, []
    fused_moe_gemm.invoke_fused_moe_gemv = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        fn()
    finally:
        fused_moe_gemm.invoke_fused_moe_gemv = real
    return len(calls)


def layer_bytes(layer, ti) -> int:
    D = int(torch.unique(ti).numel())
    names = ("w13_weight", "w2_weight", "w13_bias", "w2_bias")
    per_expert = sum(getattr(layer, n)[0].numel() * getattr(layer, n).element_size() for n in names
                     if getattr(layer, n, None) is not None)
    return D * per_expert


def _topk(logits: torch.Tensor, k: int):
    from vllm.model_executor.layers.fused_moe.router import fused_topk

    return fused_topk(logits, k, renormalize=True)


def bench(layer, shape, M: int, args, dtype, device, flush, gpu: str, peak: float) -> dict:
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import use_pairwise_alignment

    name, H, I, E, k = shape
    gen = torch.Generator(device=device).manual_seed(args.seed + M)
    x = torch.randn(M, H, generator=gen, device=device).to(dtype)
    tw, ti = _topk(torch.randn(M, E, generator=gen, device=device), k)
    fn = lambda: layer.quant_method.apply(layer, x, tw, ti)  # noqa: E731
    pairwise = use_pairwise_alignment(M * k, E)
    ref, tol, t, graphs, notes = reference(layer, x, tw, ti), lb.TOLERANCE[dtype], {}, [], []
    was = gemv_switch(False)
    try:
        for on in (False, True):
            gemv_switch(on)
            launches = count_gemv_launches(fn)
            if launches != (2 if on and pairwise else 0):
                sys.exit(f"{name} at {M} tokens, GEMV {'on' if on else 'off'}: {launches} GEMV launches (a tuned "
                         "entry with GEMV=1 for this shape?)")
            err = lb.norm_err(fn(), ref)
            if not err < tol:
                sys.exit(f"CORRECTNESS FAILED for {name} at {M} tokens, GEMV {'on' if on else 'off'}: normalised "
                         f"max error {err:.3g} (tolerance {tol})")
            timed = (lb.time_cuda(fn, flush, args.reps, not args.no_graph) if device.type == "cuda"
                     else lb.time_cpu(fn, args.reps))
            t[on], g, n = timed
            graphs.append(g)
            if n:
                notes.append(f"GEMV {'on' if on else 'off'}: {n}")
    finally:
        gemv_switch(was)
    nbytes = layer_bytes(layer, ti)
    min_us = nbytes / peak * 1e6
    return dict(shape=name, tokens=M, experts=int(torch.unique(ti).numel()), pairwise=pairwise, dot=t[False],
                gemv=t[True], ratio=t[False] / t[True], gbs=nbytes / (t[True] * 1e-6) / 1e9,
                roof_dot=100 * min_us / t[False], roof_gemv=100 * min_us / t[True],
                graph="yes" if all(graphs) else "no", gpu=gpu, notes=notes)


def table(rows: list[dict]) -> str:
    lines = ["| shape | tokens | experts | GEMV applies (pairwise) | tl.dot (us) | GEMV (us) | dot / GEMV "
             "| GB/s (GEMV) | % of roofline (dot / GEMV) | graph | GPU |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['experts']} | {'yes' if r['pairwise'] else 'no'} "
                     f"| {r['dot']:.1f} | {r['gemv']:.1f} | {r['ratio']:.2f} | {r['gbs']:.4g} "
                     f"| {r['roof_dot']:.0f} % / {r['roof_gemv']:.0f} % | {r['graph']} | {r['gpu']} |")
    return "\n".join(lines)


def sweep_configs(base, K: int) -> list:
    """The GEMV heuristic's config; the tiles of ``SWEEP_N`` x ``SWEEP_K`` (at most 16384 weights per K-step) at
    its warps and split; its tiles with the other warps of ``SWEEP_WARPS`` and with the splits of ``SWEEP_SPLITS``
    (where K holds two K-tiles per split)."""
    import dataclasses

    grid = [base]
    for bn, bk in itertools.product(SWEEP_N, SWEEP_K):
        if bn * bk <= 16384 and bk <= 2 * K:
            grid.append(dataclasses.replace(base, block_size_n=bn, block_size_k=bk))
    grid += [dataclasses.replace(base, num_warps=w) for w in SWEEP_WARPS]
    grid += [dataclasses.replace(base, split_k=s) for s in SWEEP_SPLITS if K // base.block_size_k >= 2 * s]
    return list(dict.fromkeys(grid))  # in order, without repeats


def sweep(layer, shape, tokens: list[int], args, dtype, device, flush) -> list[str]:
    """Each GEMM alone at each pairwise token count: the dot kernel's config vs the GEMV's (see the docstring)."""
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as g
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemv import gemv_config
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (pairwise_alignment,
                                                                               use_pairwise_alignment)

    name, H, I, E, k = shape
    lines = []
    timer = ((lambda fn: lb.time_cuda(fn, flush, args.reps, not args.no_graph)[0]) if device.type == "cuda"
             else (lambda fn: lb.time_cpu(fn, 1)[0]))
    for M in (m for m in tokens if use_pairwise_alignment(m * k, E)):
        gen = torch.Generator(device=device).manual_seed(args.seed + M)
        ti = torch.randperm(E, generator=gen, device=device)[:M * k].reshape(M, k).to(torch.int32)
        tw = torch.rand(M, k, generator=gen, device=device)
        for gemm, w, N, K, rows, top_k_in in (("w13", layer.w13_weight, 2 * I, H, M, k),
                                               ("w2", layer.w2_weight, H, I, M * k, 1)):
            a = torch.randn(rows, K, generator=gen, device=device).to(dtype)
            dot_cfg = g.get_fused_moe_config(M * k, E, N, K, top_k_in, dtype)  # sorted's = the dot kernel's tiles
            al = pairwise_alignment(ti, dot_cfg.block_size_m)
            out = torch.empty(M * k, N, device=device, dtype=dtype)
            run = lambda cfg: g.invoke_fused_moe_gemm(  # noqa: E731
                a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in, topk_weights=tw,
                mul_routed_weight=gemm == "w2", config=cfg, pairwise=True)
            run(dot_cfg)
            want = out.float().clone()
            t_dot = timer(lambda: run(dot_cfg))
            base = gemv_config(M * k, N, K, dtype, dot_cfg.block_size_m)
            times = {}
            for cfg in sweep_configs(base, K):
                out.fill_(float("nan"))
                run(cfg)
                if not lb.norm_err(out, want) < lb.TOLERANCE[dtype]:
                    sys.exit(f"sweep: {name} {gemm} at {M} tokens, {cfg}: output differs from the dot kernel's")
                times[cfg] = timer(lambda: run(cfg))
            best = min(times, key=times.get)
            entry = {kk: v for kk, v in best.to_json().items() if kk in ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "SPLIT_K",
                                                                       "num_warps", "GEMV")}
            lines.append(f"| {name} | {M} | {gemm} | {t_dot:.1f} | {times[base]:.1f} | {t_dot / times[base]:.2f} "
                         f"| {times[best]:.1f} | {t_dot / times[best]:.2f} | `{json.dumps(entry)}` |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    args = parse_args()
    device = lb.pick_device(args.smoke)
    has_cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.smoke and not has_cuda:
        dtype = torch.float16  # the interpreter's bf16 dot is not the GPU's
    shapes = [SMOKE_SHAPE] if args.smoke else [lb.SHAPES[s] for s in args.shapes]
    args.reps = args.reps or (100 if has_cuda else 2)
    gpu = torch.cuda.get_device_name(device) if has_cuda else "cpu (interpreter)"
    peak = lb.peak_bandwidth(device)
    print(f"device: {gpu}; {str(dtype).replace('torch.', '')}; biases {'on' if args.bias else 'off'}; copy bandwidth "
          f"(read + write) {peak / 1e9:.0f} GB/s", flush=True)
    flush = torch.empty(lb.FLUSH_BYTES // 4, dtype=torch.float32, device=device) if has_cuda else None
    rows, notes, sweep_lines = [], [], []
    for shape in shapes:
        layer = build(shape, dtype, device, args.bias, args.seed)
        for M in args.tokens:
            r = bench(layer, shape, M, args, dtype, device, flush, gpu, peak)
            notes += [f"{r['shape']} {M} tokens: {n}" for n in r["notes"]]
            print(f"  {r['shape']} {M:3d} tokens: dot {r['dot']:8.1f} us  GEMV {r['gemv']:8.1f} us  "
                  f"x{r['ratio']:.2f}  {r['roof_gemv']:3.0f} % of roofline", flush=True)
            rows.append(r)
        if args.sweep:
            sweep_lines += sweep(layer, shape, args.tokens, args, dtype, device, flush)
        del layer
        if has_cuda:
            torch.cuda.empty_cache()
    text = "\n".join([
        f"## bf16 MoE GEMV at decode vs the tl.dot kernel: {gpu}, {str(dtype).replace('torch.', '')}, "
        f"biases {'on' if args.bias else 'off'}",
        "", table(rows), "", "Notes:",
        "- Timed: `quant_method.apply(...)` with routing precomputed (alignment, both GEMMs, activation, top-k sum); "
        "`tl.dot` = GEMV_PAIRWISE off (tuned / heuristic tiles), `GEMV` = on. Both checked against an fp32 loop first.",
        f"- Bytes: the routed experts' w13 + w2 (+ biases); copy bandwidth {peak / 1e9:.0f} GB/s (read + write).",
        *[f"- {n}" for n in notes], ""])
    if sweep_lines:
        text += "\n".join(["", "### Each GEMM alone (pairwise launch): tl.dot vs the GEMV heuristic vs the best swept",
                           "", "| shape | tokens | GEMM | tl.dot (us) | GEMV heuristic (us) | dot / heuristic "
                           "| best GEMV (us) | dot / best | best entry |",
                           "|---|---:|---|---:|---:|---:|---:|---:|---|",
                           *sweep_lines, ""])
    lb.emit(text, args.out)


if __name__ == "__main__":
    main()
