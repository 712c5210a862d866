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
"""
from __future__ import annotations

import argparse
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
    b_list = [(torch.randn(L, n, rank, generator=g) / rank ** 0.5).to(dtype).to(device) for n in n_sizes]
    a_list = [a_all[s] for s in range(S)]  # views of one buffer: one launch for all slices
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


def bench_row(name: str, K: int, n_sizes: list[int], T: int, args, dtype, device, flush, sweep: list[dict]):
    from vllm.kernel_configs.tile_config import LoRALinearTileConfig
    from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear, lora_linear_config

    x, a_list, b_list, y0, mapping = make_case(K, n_sizes, T, args.num_loras, args.rank, dtype, device, args.seed)
    ref = reference(x, a_list, b_list, y0, mapping)
    y = torch.empty_like(y0)
    base_cfg = lora_linear_config(T, K, max(n_sizes), args.rank, len(n_sizes), dtype)
    timer = (lambda fn: time_cuda(fn, flush, args.reps, True)) if device.type == "cuda" else \
        (lambda fn: time_cpu(fn, 2))
    copy_us = timer(lambda: y.copy_(y0))[0]
    results = []
    # a sweep entry: JSON keys over the heuristic's config, on the heuristic's path
    tried = [(str(c), LoRALinearTileConfig.from_json(c, source="sweep candidate", base=base_cfg))
             for c in sweep if c["token_path"] == base_cfg.token_path]
    for label, cfg in [("default", None)] + tried:
        def run(cfg=cfg):
            y.copy_(y0)
            add_lora_linear(y, x, a_list, b_list, mapping, config=cfg)
            return y
        run()
        err = norm_err(y.float(), ref)
        if err > TOLERANCE[dtype]:
            results.append((label, None, f"wrong: err {err:.2e}"))
            continue
        us = max(timer(run)[0] - copy_us, 0.0)
        results.append((label, us, ""))
    ok = [r for r in results if r[1] is not None]
    best = min(ok, key=lambda r: r[1]) if ok else None
    default = results[0]
    bytes_ = sum(a.numel() // a.shape[0] * min(T, args.num_loras) * a.element_size() for a in a_list) + \
        sum(b.numel() // b.shape[0] * min(T, args.num_loras) * b.element_size() for b in b_list) + \
        2 * y0.numel() * y0.element_size() + x.numel() * x.element_size()
    return dict(name=name, T=T, path="token" if base_cfg.token_path else "sorted", default=default[1],
                note=default[2], best=best, bytes=bytes_)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", default="qwen3", choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tokens = [t for t in args.tokens if t <= 16][:2] or [1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    H, QD, KVD = WIDTHS[args.width]
    if device.type != "cuda":
        H, QD, KVD = 64, 128, 32
    shapes = [("qkv", H, [QD, KVD, KVD]), ("o", QD, [H])]
    sweep = (token_sweep() + sorted_sweep()) if args.sweep and device.type == "cuda" else []
    peak = peak_bandwidth(device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
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
