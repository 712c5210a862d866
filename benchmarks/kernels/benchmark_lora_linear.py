"""Dense multi-LoRA op (``add_lora_linear``): the default tiles against a sweep of alternatives.

What is timed: one ``add_lora_linear`` call (rank-16 adapters in ``--num-loras`` slots,
token t uses slot t % num_loras) on the attention projections of a model width:
``qkv`` (K = hidden, three slices q/k/v in one launch) and ``o`` (K = heads * head_dim,
one slice).  Each call is captured in a CUDA graph together with a copy that resets
y; the copy alone is timed the same way and subtracted.  L2 is flushed before every
replay (``benchmark_moe_lora.time_cuda``); median of ``--reps``.

Correctness first: every config's output is compared with an fp32 torch computation
(the delta of each token from its own slot), normalised max error below the dtype's
tolerance; a config that fails is reported, not timed.

    PYTHONPATH=. python benchmarks/kernels/benchmark_lora_linear.py [--width qwen3] [--tokens 1 4 16 64 256]
        [--sweep] [--out table.md]

``--sweep`` also times the alternative tile configs and marks the fastest per row.

``--sorted-split``: the sorted path's split-K shrink + expand (``lora_linear_sorted_split.py``, off until
timed) against the shipped config and the sorted kernel at ``--tokens`` (default 32 64 128 256), with a small
sweep of its tiles on a GPU; every config checked against the fp32 reference first.

``--token-variant``: the token path's kernels A/B at ``--tokens`` (default 1 2 4 8): today's
``lora_linear_token_kernel`` (``token_kernel=0``, the heuristic's tiles) against the prefetch variant
(``token_kernel=1``, ``token_variant_config``'s tiles, and BLOCK_N 64-512) and the split-K shrink +
expand (``token_kernel=2``, ``split_variant_config``'s tiles, and BLOCK_K 128-1024); every config checked
against the fp32 reference first, and each variant's output against today's kernel's.

The q/k/v B slices are views of one buffer, with ``adapter_enabled``, as the LoRA layers launch them
(one launch for the three slices; before 2026-12-02 the benchmark's separate B tensors timed three).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_moe_lora import emit, norm_err, peak_bandwidth, time_cpu, time_cuda  # noqa: E402

# width -> (hidden, q heads * head_dim, kv heads * head_dim)
WIDTHS = {"qwen3": (2048, 4096, 512), "mixtral": (4096, 4096, 1024), "gpt-oss": (2880, 4096, 512)}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def token_sweep() -> list[dict]:
    out = []
    for bk in (256, 512, 1024):
        for bn in (32, 64):
            for nw in (2, 4):
                out.append(dict(BLOCK_K=bk, BLOCK_N=bn, num_warps=nw, token_path=True))
    return out


def sorted_sweep() -> list[dict]:
    out = []
    for bm in (16,):
        for bn in (64, 128):
            for bk in (64, 128):
                for splits in (8, 16, 32):
                    out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_N_SPLITS=splits, num_stages=3,
                                    token_path=False))
    return out


def make_case(K: int, n_sizes: list[int], T: int, L: int, rank: int, dtype, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = len(n_sizes)
    a_all = (torch.randn(S, L, rank, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b_all = (torch.randn(S, L, max(n_sizes), rank, generator=g) / rank ** 0.5).to(dtype).to(device)
    b_list = [b_all[s, :, :n] for s, n in enumerate(n_sizes)]
    a_list = [a_all[s] for s in range(S)]  # views of one buffer (as the LoRA layers): one launch for all slices
    x = torch.randn(T, K, generator=g).to(dtype).to(device)
    y0 = torch.randn(T, sum(n_sizes), generator=g).to(dtype).to(device)
    mapping = (torch.arange(T, dtype=torch.int32) % L).to(device)
    return x, a_list, b_list, y0, mapping


def reference(x, a_list, b_list, y0, mapping) -> torch.Tensor:
    y = y0.float().clone()
    col = 0
    for a, b in zip(a_list, b_list):
        n = b.shape[1]
        for t in range(x.shape[0]):
            s = int(mapping[t])
            y[t, col:col + n] += (x[t].float() @ a[s].float().T) @ b[s].float().T
        col += n
    return y


def time_configs(K: int, n_sizes: list[int], T: int, args, dtype, device, flush, configs: list):
    """[(label, us or None, note)] of ``add_lora_linear`` at each (label, config) (None: the default),
    each checked against the fp32 reference before it is timed; and the outputs (None where wrong)."""
    from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, lora_linear_metadata

    x, a_list, b_list, y0, mapping = make_case(K, n_sizes, T, args.num_loras, args.rank, dtype, device, args.seed)
    enabled = torch.ones(args.num_loras + 1, dtype=torch.int32, device=device)
    # the sorted path's token grouping, made once per step by the Punica wrapper (shared by all layers): not timed
    meta = lora_linear_metadata(mapping, args.num_loras)
    ref = reference(x, a_list, b_list, y0, mapping)
    y = torch.empty_like(y0)
    timer = (lambda fn: time_cuda(fn, flush, args.reps, True)) if device.type == "cuda" else \
        (lambda fn: time_cpu(fn, 2))
    copy_us = timer(lambda: y.copy_(y0))[0]
    results, outputs = [], []
    for label, cfg in configs:
        def run(cfg=cfg):
            y.copy_(y0)
            add_lora_linear(y, x, a_list, b_list, mapping, adapter_enabled=enabled, meta=meta, config=cfg)
            return y
        run()
        err = norm_err(y.float(), ref)
        if err > TOLERANCE[dtype]:
            results.append((label, None, f"wrong: err {err:.2e}"))
            outputs.append(None)
            continue
        outputs.append(y.float().clone())
        us = max(timer(run)[0] - copy_us, 0.0)
        results.append((label, us, ""))
    return results, outputs


def bench_row(name: str, K: int, n_sizes: list[int], T: int, args, dtype, device, flush, sweep: list[dict]):
    from vllm.kernel_configs.tile_config import LoRALinearTileConfig
    from vllm.lora.ops.triton_ops.lora_linear import kernel0_config

    base_cfg = kernel0_config(T, K, max(n_sizes), args.rank, len(n_sizes), dtype)
    # a sweep entry: JSON keys over lora_linear_token_kernel's / the sorted path's heuristic config (the token
    # path's variants have their own A/B: --token-variant)
    tried = [(str(c), LoRALinearTileConfig.from_json(c, source="sweep candidate", base=base_cfg))
             for c in sweep if c["token_path"] == base_cfg.token_path]
    results, _ = time_configs(K, n_sizes, T, args, dtype, device, flush, [("default", None)] + tried)
    ok = [r for r in results if r[1] is not None]
    best = min(ok, key=lambda r: r[1]) if ok else None
    default = results[0]
    size = torch.finfo(dtype).bits // 8
    used = min(T, args.num_loras)
    bytes_ = (used * args.rank * (K * len(n_sizes) + sum(n_sizes)) + 2 * T * sum(n_sizes) + T * K) * size
    return dict(name=name, T=T, path="token" if base_cfg.token_path else "sorted", default=default[1],
                note=default[2], best=best, bytes=bytes_)


def variant_rows(name: str, K: int, n_sizes: list[int], T: int, args, dtype, device, flush) -> str:
    """One table row: today's token kernel and the sorted path against the two token variants (default tiles,
    and a small sweep)."""
    from vllm.lora.ops.triton_ops.lora_linear import kernel0_config, split_variant_config, token_variant_config

    N, R, S = max(n_sizes), args.rank, len(n_sizes)
    today = dataclasses.replace(kernel0_config(T, K, N, R, S, dtype), token_path=True, token_kernel=0)
    prefetch = token_variant_config(T, K, N, R, S, dtype)
    split = split_variant_config(T, K, N, R, S, dtype)
    configs = [("today", today), ("prefetch", prefetch), ("split-K", split),
               ("sorted", kernel0_config(T, K, N, R, S, dtype, sorted_path=True))]
    if device.type == "cuda":
        configs += [(f"prefetch BLOCK_N={bn}", dataclasses.replace(prefetch, block_n=bn))
                    for bn in (64, 128, 256, 512) if bn != prefetch.block_n]
        configs += [(f"split-K BLOCK_K={bk}", dataclasses.replace(split, block_k=bk))
                    for bk in (128, 256, 512, 1024) if bk != split.block_k]
    results, outputs = time_configs(K, n_sizes, T, args, dtype, device, flush, configs)
    for i in range(1, len(results)):  # each variant against today's kernel too
        if outputs[0] is not None and outputs[i] is not None and norm_err(outputs[i], outputs[0]) > TOLERANCE[dtype]:
            results[i] = (results[i][0], None, f"differs from today's kernel: {norm_err(outputs[i], outputs[0]):.2e}")
    fmt = lambda r: f"{r[1]:.1f}" if r[1] is not None else r[2]  # noqa: E731
    ok = [r for r in results[1:3] + results[4:] if r[1] is not None]  # the token variants
    best = min(ok, key=lambda r: r[1]) if ok else None
    ratio = lambda r: f"{r[1] / best[1]:.2f}" if best and r[1] and best[1] else "-"  # noqa: E731
    return (f"| {name} | {T} | {fmt(results[3])} | {fmt(results[0])} | {fmt(results[1])} | {fmt(results[2])} | "
            f"{fmt(best) if best else '-'} | {best[0] if best else '-'} | {ratio(results[0])} | {ratio(results[3])} |")


def sorted_split_rows(name: str, K: int, n_sizes: list[int], T: int, args, dtype, device, flush) -> str:
    """One table row: the shipped config (``lora_linear_config``), the sorted kernel, and the sorted path's split
    pair (``sorted_split_config``'s tiles, and on a GPU BLOCK_K 256-1024 / BLOCK_N 64-256 / BLOCK_M 16-32)."""
    from vllm.lora.ops.triton_ops.lora_linear import kernel0_config, lora_linear_config
    from vllm.lora.ops.triton_ops.lora_linear_sorted_split import sorted_split_config

    N, R, S = max(n_sizes), args.rank, len(n_sizes)
    shipped = lora_linear_config(T, K, N, R, S, dtype)
    split = sorted_split_config(T, K, N, R, dtype)
    configs = [("shipped", shipped), ("sorted", kernel0_config(T, K, N, R, S, dtype, sorted_path=True)),
               ("split", split)]
    if device.type == "cuda":
        configs += [(f"split BLOCK_K={bk}", dataclasses.replace(split, block_k=bk))
                    for bk in (256, 512, 1024) if bk != split.block_k and bk <= K]
        configs += [(f"split BLOCK_N={bn}", dataclasses.replace(split, block_n=bn))
                    for bn in (64, 128, 256) if bn != split.block_n]
        configs += [(f"split BLOCK_M={bm}", dataclasses.replace(split, block_m=bm))
                    for bm in (16, 32) if bm != split.block_m]
    results, _ = time_configs(K, n_sizes, T, args, dtype, device, flush, configs)
    fmt = lambda r: f"{r[1]:.1f}" if r[1] is not None else r[2]  # noqa: E731
    ok = [r for r in results[2:] if r[1] is not None]
    best = min(ok, key=lambda r: r[1]) if ok else None
    path = "token" if shipped.token_path else "sorted"
    ratio = f"{results[0][1] / best[1]:.2f}" if best and results[0][1] else "-"
    return (f"| {name} | {T} | {path} {fmt(results[0])} | {fmt(results[1])} | {fmt(results[2])} | "
            f"{fmt(best) if best else '-'} | {best[0] if best else '-'} | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--token-variant", action="store_true",
                   help="A/B the token path's kernels (today's vs the two variants); tokens default 1 2 4 8")
    p.add_argument("--sorted-split", action="store_true",
                   help="A/B the sorted path's split pair (lora_linear_sorted_split.py) against the shipped config "
                        "and the sorted kernel; tokens default 32 64 128 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tokens is None:
        args.tokens = [1, 2, 4, 8] if args.token_variant else [32, 64, 128, 256] if args.sorted_split else \
            [1, 4, 16, 64, 256]
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens = [t for t in args.tokens if t <= (40 if args.sorted_split else 16)][:2] or [1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    H, QD, KVD = WIDTHS[args.width]
    if device.type != "cuda":
        H, QD, KVD = 64, 128, 32
    shapes = [("qkv", H, [QD, KVD, KVD]), ("o", QD, [H])]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    ab = {"token_variant": ("the token path, today's kernel vs the variants", variant_rows,
                            "| proj | tokens | sorted path (us) | today (us) | prefetch (us) | split-K (us) | "
                            "best variant (us) | best config | today / best | sorted / best |",
                            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"),
          "sorted_split": ("the sorted path, the split pair vs the shipped config", sorted_split_rows,
                           "| proj | tokens | shipped: path (us) | sorted kernel (us) | split pair (us) | "
                           "best split (us) | best split config | shipped / best split |",
                           "|---|---:|---|---:|---:|---:|---|---:|")}
    for flag, (what, row, header, rule) in ab.items():
        if getattr(args, flag):
            lines = [f"# dense LoRA {what}, {gpu}, {dtype}, {args.width} width, rank {args.rank}, {args.num_loras} "
                     "slots (us per call, graph replay, L2 flushed)", "", header, rule]
            for name, K, ns in shapes:
                for T in args.tokens:
                    lines.append(row(name, K, ns, T, args, dtype, device, flush))
                    print(lines[-1], flush=True)
            emit("\n".join(lines), args.out)
            return
    sweep = (token_sweep() + sorted_sweep()) if args.sweep and device.type == "cuda" else []
    peak = peak_bandwidth(device)
    lines = [f"# add_lora_linear, {gpu}, {dtype}, {args.width} width, rank {args.rank}, {args.num_loras} slots; "
             f"copy bandwidth {peak / 1e12:.2f} TB/s", "",
             "| proj | tokens | path | default (us) | GB/s | best (us) | best config |", "|---|---:|---|---:|---:|---:|---|"]
    for name, K, ns in shapes:
        for T in args.tokens:
            r = bench_row(name, K, ns, T, args, dtype, device, flush, sweep)
            d = r["default"]
            best = r["best"]
            gbs = f"{r['bytes'] / (d * 1e-6) / 1e9:.0f}" if d else "-"
            lines.append(f"| {name} | {T} | {r['path']} | {f'{d:.1f}' if d is not None else r['note']} | {gbs} | "
                         f"{f'{best[1]:.1f}' if best else '-'} | {best[0] if best else '-'} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
