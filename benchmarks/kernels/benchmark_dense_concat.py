"""The dense LoRA as extra GEMM columns (``vllm/lora/layers/dense_concat.py``) against today's projection + LoRA op.

Per attention projection of a model width (``qkv``: K = hidden, three slices; ``o``: K = heads * head_dim) and
token count, one LoRA layer forward with 4 rank-16 adapters (token t in slot t % 4; buffers of ``--max-lora-rank``
32, as the decode A/B's engine), three ways:
the projection alone (F.linear, no LoRA), today's path (the projection, then ``add_lora_linear``), and the
concatenated one (the wide input in one launch, then one GEMM on ``[x | s]`` and ``[W | B]``).  Correctness
first: both LoRA outputs against an fp32 reference (x @ W^T + each token's own slot's delta), normalised max
error below the dtype's tolerance.  Timed as CUDA-graph replays with the L2 flushed, median of ``--reps``.

    PYTHONPATH=. python benchmarks/kernels/benchmark_dense_concat.py [--tokens 64 128 256 1024] [--out t.md]
    --smoke: tiny widths on CPU under TRITON_INTERPRET=1 (the code path only, nothing timed).
    --sweep: first the concatenated shrink alone (``lora_concat_shrink``) at each tile config of ``SWEEP`` (each
        checked against the torch path), the fastest per projection and token count marked; the layer table then
        runs the module's defaults.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.bench_timing import FLUSH_BYTES, emit, norm_err, pick_device, time_cuda  # noqa: E402

# name -> (hidden, heads, kv heads, head dim): Qwen3-30B-A3B's attention (FACTS.md 1)
WIDTHS = {"qwen3": (2048, 32, 4, 128)}
SMOKE_WIDTH = (64, 4, 2, 16)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}
# lora_concat's module knobs: rows a program, K tiles a program, warps, stages, slots of a slice a program
SWEEP = [dict(BLOCK_M=m, MAX_K_STEPS=k, NUM_WARPS=w, NUM_STAGES=st, SLOT_GROUP=g)
         for m, k, w, st, g in [(16, 8, 4, 3, 1), (16, 16, 4, 3, 1), (16, 4, 4, 3, 1), (32, 8, 4, 3, 1),
                                (64, 8, 4, 3, 1), (16, 8, 8, 3, 1), (16, 8, 4, 2, 1), (16, 8, 4, 4, 1),
                                (16, 8, 4, 3, 4), (16, 8, 8, 3, 4), (32, 8, 4, 3, 4), (16, 16, 4, 3, 4),
                                (16, 8, 4, 3, 2)]]
SMOKE_SWEEP = SWEEP[:1] + SWEEP[8:9]


def sweep_lines(kind: str, width, T: int, dtype, device, flush, reps: int,
                configs: list[dict]) -> tuple[list[str], list[float]]:
    """One row per config: the shrink alone (4 slots of rank 16, token t in slot t % 4), checked first; and each
    config's time (inf where wrong)."""
    from vllm.lora.ops.triton_ops import lora_concat as lc

    H, heads, kv, hd = width
    K, S = (H, 3) if kind == "qkv" else (heads * hd, 1)
    gen = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, K, generator=gen).to(dtype).to(device)
    # the layer's view: rank 16 of buffers of max_lora_rank 32 (strided as the engine passes it)
    a = (torch.randn(S, 4, 32, K, generator=gen) / K ** 0.5).to(dtype).to(device)[:, :, :16]
    mapping = (torch.arange(T, dtype=torch.int32) % 4).to(device)
    want = torch.empty(T, K + S * 64, dtype=dtype, device=device)
    lc.lora_concat_shrink_torch(x, a, mapping, want)
    before = {n: getattr(lc, n) for n in configs[0]}
    rows = []
    try:
        for cfg in configs:
            for n, v in cfg.items():
                setattr(lc, n, v)
            out = torch.full_like(want, float("nan"))
            lc.lora_concat_shrink(x, a, mapping, out)
            err = norm_err(out.float(), want.float())
            if not err <= TOLERANCE[dtype]:
                rows.append((float("inf"), cfg, f"wrong (normalised max error {err:.3g})"))
                continue
            us = time_cuda(lambda: (lc.lora_concat_shrink(x, a, mapping, out), out)[1], flush, reps,
                           True)[0] if device.type == "cuda" else 0.0
            rows.append((us, cfg, ""))
    finally:
        for n, v in before.items():
            setattr(lc, n, v)
    best = min(r[0] for r in rows)
    return [f"| {kind} | {T} | " + " | ".join(str(v) for v in cfg.values()) + f" | {us:.1f} | "
            f"{'**best**' if us == best else note} |" for us, cfg, note in rows], [r[0] for r in rows]


def best_overall(configs: list[dict], totals: list[float]) -> str:
    """The decode A/B's flags for the config with the least time summed over the sweep's rows."""
    cfg = configs[min(range(len(configs)), key=lambda i: totals[i])]
    return " ".join(f"--set vllm.lora.ops.triton_ops.lora_concat.{n}={v}" for n, v in cfg.items())


def build(kind: str, width, T: int, L: int, R: int, dtype, device, concat: bool, seed: int, smoke: bool = False,
          max_rank: int = 32):
    """(LoRA layer, [(A slices, B slices)] per slot, W) with ``CONCAT_K`` = ``concat`` (``smoke``: any K); buffers
    of ``max_rank`` (the engine's max_lora_rank), adapters of rank R."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import dense_concat
    from vllm.lora.layers.linear import linear_lora_class
    from vllm.lora.punica_wrapper import get_punica_wrapper
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    H, heads, kv, hd = width
    base = QKVParallelLinear(H, hd, heads, kv) if kind == "qkv" else RowParallelLinear(heads * hd, H)
    base = base.to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(tuple(base.weight.shape), generator=gen) / base.weight.shape[1] ** 0.5).to(dtype)
    base.weight.data.copy_(W)
    cfg = LoRAConfig(max_loras=L, max_lora_rank=max_rank)
    names = ("CONCAT_K", "CONCAT_MIN_TOKENS", "CONCAT_ON_CPU", "CONCAT_MAX_FRACTION")
    before = [getattr(dense_concat, n) for n in names]
    for n, v in zip(names, (concat, 1, True, 100.0 if smoke else dense_concat.CONCAT_MAX_FRACTION)):
        setattr(dense_concat, n, v)
    try:
        layer = linear_lora_class(base, cfg)(base)
        layer.create_lora_weights(L, cfg)
    finally:
        for n, v in zip(names, before):
            setattr(dense_concat, n, v)
    if concat and layer._concat_w is None:
        sys.exit(f"{kind}: the concatenated path does not apply at this width (CONCAT_MAX_FRACTION)")
    sizes = [heads * hd, kv * hd, kv * hd] if kind == "qkv" else [H]
    K = W.shape[1]
    adapters = []
    for slot in range(L):
        a = [(torch.randn(R, K, generator=gen) / K ** 0.5).to(dtype) for _ in sizes]
        b = [(torch.randn(n, R, generator=gen) / R ** 0.5).to(dtype) for n in sizes]
        layer.set_lora(slot, a, b)
        adapters.append((a, b))
    punica = get_punica_wrapper(max(T, 8), L, device, kind="gpu")
    layer.set_mapping(punica)
    punica.update_metadata([t % L for t in range(T)])
    if concat and layer._concat_rank != layer.kernel_rank:
        sys.exit(f"{kind}: kernel rank {layer.kernel_rank} is past the wide buffer's {layer._concat_cap} columns")
    return layer, adapters, W


def reference(x, W, adapters, L: int) -> torch.Tensor:
    y = x.float() @ W.float().T
    for t in range(x.shape[0]):
        a, b = adapters[t % L]
        y[t] += torch.cat([bb.float() @ (aa.float() @ x[t].float()) for aa, bb in zip(a, b)])
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 128, 256, 1024])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--max-lora-rank", type=int, default=32, help="the LoRA buffers' rank (the decode A/B's: 32)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--sweep", action="store_true", help="first the shrink alone at each config of SWEEP")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = pick_device(args.smoke)
    from vllm.lora.layers import dense_concat

    dense_concat.CONCAT_MIN_TOKENS = 1  # every token count of the table runs concatenated (the engine: from 65)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    width = SMOKE_WIDTH if args.smoke else WIDTHS[args.width]
    tokens = [5, 9] if args.smoke else args.tokens
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    flush = torch.empty(FLUSH_BYTES if device.type == "cuda" else 8, dtype=torch.uint8, device=device)
    lines = [f"Dense LoRA, {args.width if not args.smoke else 'smoke'} width, 4 adapters of rank 16, {gpu}; us "
             "(CUDA-graph replay, L2 flushed, median)", "",
             "| projection | tokens | projection alone | + LoRA today | concatenated | today - alone | "
             "concatenated - alone | concatenated / today | GPU |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    if args.sweep:
        sweep = ["| projection | tokens | BLOCK_M | K steps | warps | stages | slots a program | shrink (us) | |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        configs = SMOKE_SWEEP if args.smoke else SWEEP
        totals = [0.0] * len(configs)
        for kind in ("qkv", "o"):
            for T in tokens:
                rows, times = sweep_lines(kind, width, T, dtype, device, flush, args.reps, configs)
                sweep += rows
                totals = [a + b for a, b in zip(totals, times)]
        sweep += ["", f"best overall: {best_overall(configs, totals)}"]
        print("\n".join([f"The concatenated shrink alone, {gpu}; us", ""] + sweep), flush=True)
        lines = [f"The concatenated shrink alone, {gpu}; us", ""] + sweep + [""] + lines
    for kind in ("qkv", "o"):
        for T in tokens:
            x = (torch.randn(T, width[1] * width[3] if kind == "o" else width[0]) * 0.5).to(dtype).to(device)
            kw = dict(seed=T, smoke=args.smoke, max_rank=args.max_lora_rank)
            today, adapters, W = build(kind, width, T, 4, 16, dtype, device, False, **kw)
            concat, _, _ = build(kind, width, T, 4, 16, dtype, device, True, **kw)
            ref = reference(x.cpu(), W, adapters, 4)
            for name, layer in (("today", today), ("concatenated", concat)):
                err = norm_err(layer(x).float().cpu(), ref)
                if err > TOLERANCE[dtype]:
                    sys.exit(f"{kind} {T} tokens, {name}: normalised max error {err:.3g} > {TOLERANCE[dtype]}")
            if device.type != "cuda":
                print(f"{kind} {T}: both paths match the reference (smoke, not timed)")
                continue
            Wd = W.to(device)
            t_base = time_cuda(lambda: F.linear(x, Wd), flush, args.reps, True)[0]
            t_today = time_cuda(lambda: today(x), flush, args.reps, True)[0]
            t_cat = time_cuda(lambda: concat(x), flush, args.reps, True)[0]
            lines.append(f"| {kind} | {T} | {t_base:.1f} | {t_today:.1f} | {t_cat:.1f} | {t_today - t_base:.1f} | "
                         f"{t_cat - t_base:.1f} | {t_cat / t_today:.2f} | {gpu} |")
    if device.type == "cuda":
        emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
