"""A dense projection with its multi-LoRA delta at decode's GEMV sizes: the separate path (``dense_gemv``, then
``add_lora_linear``: the shipped one) vs ``gemv_with_lora`` (the split-K shrink, then the GEMV with the expand
in its epilogue: ``vllm/lora/ops/triton_ops/gemv_lora.py``, off by default until this shows it faster).

What is timed: one projection with LoRA, for the q/k/v (3 slices) and o projections of Qwen3-30B-A3B, Mixtral-8x7B
and gpt-oss-20b (biased), ``--ranks`` (default 16), ``--num-loras`` adapters (token t on slot t % L), at
``--tokens`` (default 1, the GEMV's size in the engine); the GEMV alone beside them.  CUDA-graph replay, L2
flushed before each replay, median of ``--reps`` (``bench_timing.py``).

Correctness first: both paths' outputs are compared with a float64 x W^T + bias + delta (normalised max error
within the dtype's tolerance) before anything is timed.

Bytes: W (+ bias), x, y and the A / B of the slots the tokens use; "% of roofline" = (bytes / copy bandwidth) /
time, the copy bandwidth measured here.

    PYTHONPATH=. python benchmarks/kernels/benchmark_gemv_lora.py [--shapes qwen3 mixtral gpt-oss]
        [--tokens 1 2] [--ranks 16 32] [--num-loras 4] [--reps 100] [--out table.md]
    --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 (exercises the code path only).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.bench_timing import add_run_args, emit, norm_err, pick_device, run_setup  # noqa: E402

# shape -> [(projection, slice widths, K, bias)]
SHAPES = {
    "qwen3": [("qkv", [4096, 512, 512], 2048, False), ("o", [2048], 4096, False)],
    "mixtral": [("qkv", [4096, 1024, 1024], 4096, False), ("o", [4096], 4096, False)],
    "gpt-oss": [("qkv", [4096, 512, 512], 2880, True), ("o", [2880], 4096, True)],
}
NAMES = {"qwen3": "Qwen3-30B-A3B", "mixtral": "Mixtral-8x7B", "gpt-oss": "gpt-oss-20b", "smoke": "smoke"}
SMOKE = {"smoke": [("qkv", [32, 16, 16], 64, True), ("o", [48], 96, False)]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1])
    p.add_argument("--ranks", nargs="+", type=int, default=[16])
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    add_run_args(p, smoke="tiny shapes", out="also write the table (markdown) here")
    return p.parse_args()


def _case(widths, K, R, L, M, has_bias, dtype, device, gen):
    """W [N, K], bias, the LoRA buffers (one buffer per side, as the LoRA layers allocate them), x, mapping."""
    N = sum(widths)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    b = (torch.randn(N, generator=gen) * 0.1).to(device=device, dtype=dtype) if has_bias else None
    a_buf = (torch.randn(len(widths), L, R, K, generator=gen) / K ** 0.5).to(device=device, dtype=dtype)
    b_buf = (torch.randn(len(widths), L, max(widths), R, generator=gen) / R ** 0.5).to(device=device, dtype=dtype)
    lora_a = tuple(a_buf.unbind(0))
    lora_b = tuple(b_buf[s, :, :n] for s, n in enumerate(widths))
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    mapping = (torch.arange(M, dtype=torch.int32) % L).to(device)
    return w, b, lora_a, lora_b, x, mapping


def _reference(x, w, b, lora_a, lora_b, mapping) -> torch.Tensor:
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
    col = 0
    for a_s, b_s in zip(lora_a, lora_b):
        n = b_s.shape[1]
        for t, slot in enumerate(mapping.tolist()):
            ref[t, col:col + n] += b_s[slot].double() @ (a_s[slot].double() @ x[t].double())
        col += n
    return ref


def main() -> None:
    args = parse_args()
    device = pick_device(args.smoke)
    from vllm.lora.ops.triton_ops.gemv_lora import gemv_with_lora
    from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear
    from vllm.model_executor.layers.ops.dense_gemv import dense_gemv

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = SMOKE if args.smoke else {k: SHAPES[k] for k in args.shapes}
    run = run_setup(args, device)
    timed, reps, bw, gpu = run.timed, run.reps, run.bandwidth, run.gpu
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for key, projs in shapes.items():
        for proj, widths, K, has_bias in projs:
            for R in args.ranks:
                for M in args.tokens:
                    w, b, la, lb, x, mapping = _case(widths, K, R, args.num_loras, M, has_bias, dtype, device, gen)

                    def separate():
                        y = dense_gemv(x, w, b)
                        add_lora_linear(y, x, la, lb, mapping)
                        return y

                    def epilogue():
                        return gemv_with_lora(x, w, b, la, lb, mapping)

                    what = f"{NAMES[key]} {proj} rank {R} {M} tokens"
                    ref = _reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), [t.cpu() for t in la],
                                     [t.cpu() for t in lb], mapping.cpu())
                    for name, fn in (("separate", separate), ("epilogue", epilogue)):
                        err = norm_err(fn().cpu(), ref)
                        if err > tol:
                            raise SystemExit(f"{what}: the {name} path is off (vs float64 {err:.2e}, tol {tol})")
                    t_base, t_sep, t_epi = (timed(lambda: dense_gemv(x, w, b)), timed(separate), timed(epilogue))
                    N, used = sum(widths), len(set(mapping.tolist()))
                    nbytes = (w.numel() + (N if has_bias else 0) + M * (K + N)
                              + used * R * (len(widths) * K + N)) * w.element_size()
                    shape = f"{N} x {K}{' + bias' if has_bias else ''}"
                    rows.append(f"| {NAMES[key]} | {proj} | {shape} | {R} | {M} | {t_base:.1f} | {t_sep:.1f} | "
                                f"{t_epi:.1f} | {t_sep / t_epi:.2f} | {t_sep - t_base:.1f} | {t_epi - t_base:.1f} | "
                                f"{nbytes / t_epi / 1e3:.0f} | {nbytes / bw * 1e6 / t_epi:.0%} | {gpu} |")
                    print(rows[-1], flush=True)
    head = (f"{gpu}, {dtype}; {args.num_loras} adapters (token t on slot t % {args.num_loras}); copy bandwidth "
            f"{bw / 1e12:.2f} TB/s; CUDA-graph replay, L2 flushed, median of {reps}\n\n"
            "| shape | projection | N x K | rank | tokens | GEMV alone (us) | GEMV + LoRA op (us) | GEMV with LoRA "
            "epilogue (us) | separate / epilogue | LoRA cost, separate (us) | LoRA cost, epilogue (us) | epilogue "
            "GB/s | epilogue % of roofline | GPU |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    emit(head + "\n".join(rows) + "\n\nCorrectness: both paths within tolerance of float64 before timing\n", args.out)


if __name__ == "__main__":
    main()
