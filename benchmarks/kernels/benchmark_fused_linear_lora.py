"""Dense projections at decode: F.linear alone, F.linear + the LoRA op, and the fused op (one launch).

What is timed, per projection of a model width (``qkv``: K = hidden, slices q/k/v;
``o``: K = q heads * head_dim; ``gate``: the MoE router, K = hidden, N = experts)
at 1-256 tokens, ``--rank`` adapters in ``--num-loras`` slots (token t on slot t % num_loras):

* ``F.linear``: ``F.linear(x, W)`` (cuBLAS), the base projection alone;
* ``+ LoRA op``: ``F.linear`` then ``add_lora_linear`` into its output (the two-launch path; above
  16 tokens its sorted kernel, with the per-step grouping ``lora_linear_metadata`` included);
* ``fused``: ``fused_linear_lora`` with its default tiles (above 16 tokens: its tensor-core path, the
  grouping included too); ``--sweep`` also times ``sweep_configs()`` (up to 16 tokens) or
  ``batch_sweep_configs()`` (above) and reports the fastest;
* ``grouping``: ``lora_linear_metadata`` alone (above 16 tokens), made once per step for all layers
  in the engine: subtract it from both to get a layer's share.

Each call (output allocation included) is captured in a CUDA graph and replayed;
L2 is flushed (a 256 MB write) before every replay, events bracket the replay
alone, median of ``--reps`` (``benchmark_moe_lora.time_cuda``).  GB/s = bytes
the fused op must move (W, x, y, and A/B of the slots used) / its time.

Correctness first: the two-launch path and the fused op (every config) are
compared with an fp32 torch computation (normalised max error below the dtype's
tolerance); a failing default stops the run, a failing sweep config is reported
and not timed.  ``--smoke`` (the only mode without CUDA) runs tiny shapes under
TRITON_INTERPRET=1 and times wall clock, just to exercise the code.

    PYTHONPATH=. python benchmarks/kernels/benchmark_fused_linear_lora.py [--width qwen3] [--tokens 1 16 64 256]
        [--rank 16] [--num-loras 4] [--sweep] [--out table.md]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_lora_linear import WIDTHS, reference  # noqa: E402
from benchmarks.kernels.benchmark_moe_lora import (emit, norm_err, peak_bandwidth, pick_device, time_cpu,  # noqa: E402
                                                   time_cuda)
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import BATCH_MAX_TOKENS  # noqa: E402
from vllm.lora.ops.triton_ops.lora_linear import SMALL_BATCH_TOKENS  # noqa: E402

EXPERTS = {"qwen3": 128, "mixtral": 8, "gpt-oss": 32}  # router gate rows
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sweep_configs() -> list[dict]:
    """Tiles of the up-to-16-token path to time against its default (16-bit types: (stages - 1) buffers of the x, W and A tiles fit in
    an H100's shared memory; tests/lora/fused_linear_lora_hopper_compile.py --sweep checks them), and the
    usual tiles with every shrink after the main loop (``SHRINK_IN_LOOP`` off)."""
    tiles = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st)
             for bn in (16, 32, 64) for bk in (128, 256, 512) for nw in (4, 8) for st in (3, 4)
             if (32 + bn) * bk * 2 * (st - 1) <= 200 * 1024]
    return tiles + [dict(BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=4, SHRINK_IN_LOOP=False)
                    for bn in (16, 32, 64)]


def batch_sweep_configs() -> list[dict]:
    """Tiles of the 17..256-token path to time against its default (16-bit types: the x, W and A tiles
    (4 slots of rank 16) of every stage fit in an H100's shared memory;
    ``tests/lora/fused_linear_lora_batch_hopper_compile.py --sweep`` compiles them), and tiles of 16 / 64
    rows with one or no slot shrunk in the main loop (``LOOP_SLOTS``)."""
    tiles = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st)
             for bm in (32, 64) for bn in (16, 32, 64, 128) for bk in (64, 128) for nw in (4, 8) for st in (3, 4)
             if (bm + bn + 64) * bk * 2 * st <= 220 * 1024 and not (bm == 32 and nw == 8)]
    return tiles + [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=4, num_stages=4, LOOP_SLOTS=ls)
                    for bm in (16, 64) for bn in (32, 64) for ls in (0, 1)]


def make_case(K: int, n_sizes: list[int], T: int, L: int, rank: int, dtype, device, seed: int):
    """x, W, per-slice A and B as the LoRA layers hold them (views of one [S, L, ...] buffer each), mapping."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = len(n_sizes)
    x = torch.randn(T, K, generator=g).to(dtype).to(device)
    w = (torch.randn(sum(n_sizes), K, generator=g) / K ** 0.5).to(dtype).to(device)
    a_all = (torch.randn(S, L, rank, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b_all = (torch.randn(S, L, max(n_sizes), rank, generator=g) / rank ** 0.5).to(dtype).to(device)
    a_list = [a_all[s] for s in range(S)]
    b_list = [b_all[s, :, :n] for s, n in enumerate(n_sizes)]
    mapping = (torch.arange(T, dtype=torch.int32) % L).to(device)
    return x, w, a_list, b_list, mapping


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time sweep_configs() and report the fastest")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if any(not 1 <= t <= BATCH_MAX_TOKENS for t in args.tokens):
        p.error(f"--tokens: the fused op takes 1..{BATCH_MAX_TOKENS} tokens")
    return args


def bench_row(name: str, K: int, n_sizes: list[int], T: int, args, dtype, device, flush, sweep: list[dict]) -> dict:
    from vllm.kernel_configs.tile_config import FusedLinearLoRABatchTileConfig, FusedLinearLoRATileConfig
    from vllm.lora.ops.triton_ops.fused_linear_lora import fused_linear_lora, fused_linear_lora_config
    from vllm.lora.ops.triton_ops.fused_linear_lora_batch import batch_config
    from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, lora_linear_metadata

    x, w, a_list, b_list, mapping = make_case(K, n_sizes, T, args.num_loras, args.rank, dtype, device, args.seed)
    ref = reference(x, a_list, b_list, (x.float() @ w.float().T), mapping)
    grouped = T > SMALL_BATCH_TOKENS  # both paths group the tokens by slot (once per step in the engine)

    def group():
        return lora_linear_metadata(mapping, args.num_loras) if grouped else None

    def two_launch():
        y = F.linear(x, w)
        add_lora_linear(y, x, a_list, b_list, mapping, meta=group())
        return y

    tol = TOLERANCE[dtype]
    err = norm_err(two_launch().float(), ref)
    if not err < tol:
        sys.exit(f"CORRECTNESS FAILED: F.linear + add_lora_linear, {name} at {T} tokens: error {err:.2e} > {tol}")
    timer = (lambda fn: time_cuda(fn, flush, args.reps, True)) if device.type == "cuda" else \
        (lambda fn: time_cpu(fn, 2))
    base_us = timer(lambda: F.linear(x, w))[0]
    two_us = timer(two_launch)[0]
    group_us = timer(group)[0] if grouped else None
    # the default tiles of the path T takes; a sweep entry is JSON keys over them
    if grouped:
        default = batch_config(T, K, w.shape[0], args.rank, dtype, args.num_loras)
        tiles = f"BLOCK_M {default.block_m}, BLOCK_N {default.block_n}, BLOCK_K {default.block_k}"
    else:
        default = fused_linear_lora_config(T, K, w.shape[0], args.rank, dtype)
        tiles = f"BLOCK_N {default.block_n}, BLOCK_K {default.block_k}"
    cls = FusedLinearLoRABatchTileConfig if grouped else FusedLinearLoRATileConfig
    fused = []
    for label, cfg in [("default", None)] + [(str(c), cls.from_json(c, source="sweep entry", base=default))
                                             for c in sweep]:
        fn = (lambda cfg=cfg: fused_linear_lora(x, w, None, a_list, b_list, mapping, meta=group(), config=cfg))
        try:
            err = norm_err(fn().float(), ref)
        except Exception as exc:  # e.g. a sweep tile that does not fit this GPU's shared memory
            if cfg is None:
                raise
            fused.append((label, None, f"failed: {type(exc).__name__}"))
            continue
        if not err < tol:
            if cfg is None:
                sys.exit(f"CORRECTNESS FAILED: fused_linear_lora, {name} at {T} tokens: error {err:.2e} > {tol}")
            fused.append((label, None, f"wrong: err {err:.2e}"))
            continue
        us, _, note = timer(fn)
        fused.append((label, us, note))
    ok = [r for r in fused if r[1] is not None]
    best = min(ok, key=lambda r: r[1])
    slots = min(T, args.num_loras)
    elt = x.element_size()
    lora_elems = slots * args.rank * (K * len(n_sizes) + sum(n_sizes))  # A and B of the slots used
    bytes_ = (w.numel() + x.numel() + T * w.shape[0] + lora_elems) * elt
    return dict(name=name, T=T, base=base_us, two=two_us, group=group_us, fused=fused[0][1], note=fused[0][2],
                best=best, bytes=bytes_, cfg=tiles)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.smoke)
    has_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if has_cuda else torch.float32
    H, QD, KVD = WIDTHS[args.width] if not args.smoke else (64, 128, 32)
    E = EXPERTS[args.width] if not args.smoke else 8
    tokens = args.tokens if not args.smoke else [t for t in args.tokens if t <= 32][:2] or [1]
    shapes = [("qkv", H, [QD, KVD, KVD]), ("o", QD, [H]), ("gate", H, [E])]
    sweeps = {False: sweep_configs(), True: batch_sweep_configs()} if args.sweep and has_cuda else {}
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if has_cuda else None
    peak = peak_bandwidth(device)
    gpu = torch.cuda.get_device_name() if has_cuda else "CPU (interpreter, smoke)"
    head = (f"## Dense projection + LoRA at decode: {gpu}, {dtype}, {args.width} width, rank {args.rank}, "
            f"{args.num_loras} slots; copy bandwidth {peak / 1e12:.2f} TB/s")
    lines = [head, "", "| proj | tokens | F.linear (us) | + LoRA op (us) | fused (us) | fused / F.linear | "
             "saved vs two launches (us) | grouping (us) | fused GB/s | default tiles | best of sweep (us) | "
             "best config |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for name, K, ns in shapes:
        for T in tokens:
            sweep = sweeps.get(T > SMALL_BATCH_TOKENS, [])
            r = bench_row(name, K, ns, T, args, dtype, device, flush, sweep)
            f, best = r["fused"], r["best"]
            note = f" ({r['note']})" if r["note"] else ""
            group = "-" if r["group"] is None else f"{r['group']:.1f}"
            lines.append(f"| {name} | {T} | {r['base']:.1f} | {r['two']:.1f} | {f:.1f}{note} | {f / r['base']:.2f} "
                         f"| {r['two'] - f:.1f} | {group} | {r['bytes'] / (f * 1e-6) / 1e9:.0f} | {r['cfg']} "
                         f"| {best[1]:.1f} | {best[0]} |")
            print(lines[-1], flush=True)
    lines += ["", "Correctness checked first (fp32 reference). CUDA: graph replay, L2 flushed before each replay, "
              f"median of {args.reps}; smoke on CPU: interpreter wall clock, meaningless as speed."]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
