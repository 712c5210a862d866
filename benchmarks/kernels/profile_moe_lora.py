"""Where one MoE layer's LoRA time goes: the kernels of the base call and of the LoRA call, side by side.

``benchmark_moe_lora.py`` times the whole layer (base, LoRA, a baseline); this script attributes the
difference.  Per shape and token count it builds the same layer and adapters (``build_case``), checks the
LoRA call against the fp32 reference first (``check``: exits on a mismatch), then runs ``--iters`` calls of
each under ``torch.profiler`` (eager, after a warm-up; the L2 is flushed before each call) and prints one
table: every kernel with its calls and device microseconds per layer call, base and LoRA, and the
difference.  The LoRA-only kernels (the (adapter, expert) alignment, the LoRA shrink / expand) and the
base kernels that changed are what a kernel change must address.  On CPU (``--smoke``, Triton interpreter)
it lists CPU operators instead: a smoke run of the code path only.

    PYTHONPATH=. python benchmarks/kernels/profile_moe_lora.py [--shapes qwen3] [--tokens 256 4096]
        [--rank 16] [--num-loras 4] [--w13-layout slices|fused] [--iters 20] [--out profile.md]
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks.kernels.bench_timing import FLUSH_BYTES, pick_device  # noqa: E402
from benchmarks.kernels.benchmark_moe_lora import (  # noqa: E402
    DTYPES, SHAPES, SMOKE_SHAPE, build_case, check, make_inputs)


def _device_event(evt) -> bool:
    kind = getattr(evt, "device_type", None)
    return kind is not None and kind != torch.autograd.DeviceType.CPU


def is_flush_kernel(name: str) -> bool:
    """Whether a device kernel is the L2 flush (``flush.fill_``: at::native's ``FillFunctor``), not the layer's."""
    return "fill" in name.lower()


def kernel_times(fn, iters: int, flush) -> dict[str, tuple[float, float]]:
    """name -> (calls per call of ``fn``, device us per call of ``fn``) over ``iters`` profiled calls."""
    gpu = torch.cuda.is_available()
    for _ in range(3):
        fn()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            if flush is not None:
                flush.fill_(1.0)  # (its kernel is dropped below)
            fn()
        if gpu:
            torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(list)
    for evt in prof.events():
        if gpu:
            if not _device_event(evt) or is_flush_kernel(evt.name):
                continue
        elif not evt.name.startswith("aten::") or (evt.cpu_parent is not None
                                                   and evt.cpu_parent.name.startswith("aten::")):
            continue
        per[evt.name].append(evt.time_range.elapsed_us())
    return {n: (len(v) / iters, sum(v) / iters) for n, v in per.items()}


def table(base: dict, lora: dict) -> tuple[str, float, float]:
    names = sorted(set(base) | set(lora), key=lambda n: -max(lora.get(n, (0, 0))[1], base.get(n, (0, 0))[1]))
    lines = ["| kernel | calls (base / LoRA) | base us | LoRA us | LoRA - base us |", "|---|---:|---:|---:|---:|"]
    for n in names:
        cb, tb = base.get(n, (0.0, 0.0))
        cl, tl = lora.get(n, (0.0, 0.0))
        short = n if len(n) <= 80 else n[:77] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {cb:g} / {cl:g} | {tb:.1f} | {tl:.1f} | {tl - tb:+.1f} |")
    tb, tl = sum(v[1] for v in base.values()), sum(v[1] for v in lora.values())
    lines.append(f"| **sum of device time** | | **{tb:.1f}** | **{tl:.1f}** | **{tl - tb:+.1f}** |")
    return "\n".join(lines), tb, tl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen3"], choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[256, 4096])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--w13-layout", default="slices", choices=["slices", "peft", "fused"],
                   help="peft: two slices reading one A; fused: one w13 slice at twice the rank "
                        "(benchmark_moe_lora.py)")
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--iters", type=int, default=None, help="profiled calls per case (default 20; CPU smoke 1)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU (Triton interpreter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = pick_device(a.smoke)
    cuda = device.type == "cuda"
    dtype = DTYPES[a.dtype]
    iters = a.iters or (20 if cuda else 1)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)"
    flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=device) if cuda else None
    shapes = [SMOKE_SHAPE] if a.smoke else [SHAPES[s] for s in a.shapes]
    tokens = [t for t in a.tokens if t <= 64] or [7] if a.smoke else a.tokens
    out = [f"# MoE layer kernels with and without LoRA: {gpu}, {a.dtype}, rank {a.rank}, {a.num_loras} adapters "
           f"(token t on adapter t % {a.num_loras})"
           + f"; device us per layer call, mean of {iters} eager calls, "
           "L2 flushed before each", ""]
    for shape in shapes:
        case = build_case(shape, dtype, device, a.rank, a.num_loras, max(tokens), a.seed, w13_layout=a.w13_layout)
        for M in tokens:
            print(f"[{case.name}] {M} tokens: correctness {check(case, M, a.num_loras, dtype, device, a.seed)}",
                  flush=True)
            x, _, tw, ti, slots = make_inputs(case, M, a.num_loras, dtype, device, a.seed)
            case.set_mapping(slots)
            qm, layer, ctx = case.layer.quant_method, case.layer, case.layer._lora_context
            base = kernel_times(lambda: qm.apply(layer, x, tw, ti, lora_context=None), iters, flush)
            lora = kernel_times(lambda: qm.apply(layer, x, tw, ti, lora_context=ctx), iters, flush)
            text, tb, tl = table(base, lora)
            out += [f"## {case.name}, {M} tokens: device time {tb:.1f} us base, {tl:.1f} us LoRA "
                    f"({tl / max(tb, 1e-9):.2f}x)", "", text, ""]
            print(out[-4], flush=True)
    report = "\n".join(out)
    print(report)
    if a.out:
        with open(a.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
