"""Tile tuning of the fused-MoE kernels; writes tuned-config files for ``vllm/kernel_configs/tuned``.

Tuned, per layer shape (``--shapes``) and token count (``--tokens``), in this order per case:
  1. the bf16 grouped GEMM (``ops/fused_moe_gemm.py``): GEMM1 (w13, BLOCK_SIZE_M searched: it sets the
     expert alignment both GEMMs walk), then GEMM2 (w2, with GEMM1's BLOCK_SIZE_M);
  2. the MoE LoRA fused shrink+expand (``fused_moe_lora.py``), per ``--ranks``: w13 (BLOCK_SIZE_M
     searched on the sorted path), then w2 (it reuses w13's alignment).
File names, keys and table indices mirror the kernels' lookups; search spaces and their pruning:
``tune_moe_space.py``.

Each candidate: correctness first (its output against the heuristic's, normalised max error below
the dtype's tolerance; the heuristic's against an fp32 torch reference once per case), then timed:
CUDA-graph replay, L2 flushed (256 MB written) before each replay, median of ``--reps``
(``benchmark_moe_lora.time_cuda``).  The expert / (adapter, expert) alignment is made outside the
timed region, once per BLOCK_SIZE_M.  The heuristic and the 3 fastest are re-timed with
``--confirm-reps``; the winner is written only if it beats the heuristic by ``--min-gain``, else
the heuristic's config is written (the file then pins today's choice at that token count).
A candidate that fails correctness is never chosen, is listed in the table and makes the exit status 1;
one that cannot launch (e.g. out of shared memory) is counted as an error.

``--budget-s``: no new candidate or case starts past the budget; the case under way keeps its best
so far (marked partial), later cases are listed as not run.  Every finished case is merged into its
file in ``--out`` at once (existing files there are extended, so runs can be split), and the markdown
table (case, heuristic us, best us, gain, GPU) is written to ``--out``/tune_moe.md.

    PYTHONPATH=. python benchmarks/kernels/tune_moe.py --out DIR [--shapes qwen3 mixtral gpt-oss]
        [--tokens 4096 1024 256 64 16 1] [--ops gemm lora] [--ranks 16] [--num-loras 4]
        [--budget-s 240] [--max-candidates 24]
    --smoke: a tiny shape on CPU under TRITON_INTERPRET=1 (exercises the code path only).
Then: ``cp DIR/*.json vllm/kernel_configs/tuned/`` (or ``VLLM_TUNED_CONFIG_FOLDER=DIR``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:  # run as a script from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

import benchmarks.kernels.benchmark_moe_lora as lb  # noqa: E402  (shapes, timing, tolerances)
from benchmarks.kernels import tune_moe_space as space  # noqa: E402

TOKENS = [4096, 1024, 256, 64, 16, 1]  # largest first: where the tiles matter most, if the budget runs out
SMOKE_TOKENS = [1, 33]
Config = space.Config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the JSON files and tune_moe.md")
    p.add_argument("--shapes", nargs="+", default=list(lb.SHAPES), choices=list(lb.SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--ops", nargs="+", default=["gemm", "lora"], choices=["gemm", "lora"])
    p.add_argument("--ranks", nargs="+", type=int, default=[16], help="LoRA ranks (a file per rank)")
    p.add_argument("--num-loras", type=int, default=4, help="adapters (tokens round-robin); sets the LoRA path")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--reps", type=int, default=None, help="replays per screening timing (default 20)")
    p.add_argument("--confirm-reps", type=int, default=None, help="replays to re-time the top 3 (default 60)")
    p.add_argument("--max-candidates", type=int, default=24, help="per case, the heuristic included")
    p.add_argument("--w13-layout", default="slices", choices=["slices", "fused"],
                   help="the w13 LoRA: two slices of rank R (the engine's layer, peft's fused adapters too) or "
                        "(fused: FusedMoE3DWithLoRA, gate and up side by side) one slice of 2I columns at rank 2R")
    p.add_argument("--shrink-splits", nargs="*", type=int, default=[],
                   help="LoRA: also time the split-K variant with these SHRINK_SPLIT_K (sorted path), e.g. 4 8 16")
    p.add_argument("--min-gain", type=float, default=0.02, help="a winner must beat the heuristic by this")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting work after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU under TRITON_INTERPRET=1")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class Outcome:
    """One tuned kernel at one token count (a row of the table)."""
    shape: str
    tokens: int
    kernel: str  # gemm_w13 | gemm_w2 | lora_w13 | lora_w2 (LoRA: with its rank)
    heuristic_us: float = float("nan")
    best_us: float = float("nan")
    best: Config = field(default_factory=dict)
    tried: int = 0
    errors: int = 0
    failed: list = field(default_factory=list)  # (config, error) of candidates with wrong outputs
    partial: bool = False
    note: str = ""


class Tuner:
    """The clock, the timer and the candidate loop, shared by every case."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.on_gpu = device.type == "cuda"
        self.deadline = time.monotonic() + args.budget_s if args.budget_s is not None else float("inf")
        self.flush = torch.empty(lb.FLUSH_BYTES // 4, dtype=torch.float32, device=device) if self.on_gpu else None
        self.device_name = torch.cuda.get_device_name(device) if self.on_gpu else "cpu"
        self.tol = lb.TOLERANCE[dtype]

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def time_us(self, fn: Callable[[], torch.Tensor], reps: int) -> float:
        if self.on_gpu:
            return lb.time_cuda(fn, self.flush, reps, use_graph=True)[0]
        return lb.time_cpu(fn, 1)[0]

    def search(self, res: Outcome, cands: list[Config], run: Callable[[Config], torch.Tensor],
               reference: torch.Tensor) -> Config:
        """Check and time ``cands`` (the heuristic first); fill ``res``; return the config to write."""
        heur = cands[0]
        base = run(heur).float().clone()
        err = lb.norm_err(base, reference)
        if not err < self.tol:
            res.failed.append((heur, err))
            res.note = f"heuristic output wrong vs the fp32 reference ({err:.2e}): not tuned"
            return heur
        reps = self.args.reps or (20 if self.on_gpu else 1)
        timed = [(self.time_us(lambda: run(heur), reps), heur)]
        res.tried = 1
        for cand in cands[1:]:
            if self.out_of_time():
                res.partial = True
                break
            try:
                err = lb.norm_err(run(cand), base)
                if err < self.tol:
                    timed.append((self.time_us(lambda: run(cand), reps), cand))
            except Exception as exc:  # cannot launch this config (e.g. out of shared memory / registers)
                res.errors += 1
                print(f"    skip {cand}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                continue
            res.tried += 1
            if not err < self.tol:
                res.failed.append((cand, err))
                print(f"    CORRECTNESS FAILED {cand}: normalised max error {err:.2e}", flush=True)
        if self.on_gpu and not self.out_of_time():  # re-time the heuristic and the 3 fastest, longer
            confirm = self.args.confirm_reps or 60
            top = [heur] + [c for _, c in sorted(timed[1:], key=lambda tc: tc[0])[:3]]
            timed = [(self.time_us(lambda: run(c), confirm), c) for c in top]
        res.heuristic_us = timed[0][0]
        best_us, best = min(timed, key=lambda tc: tc[0])
        if best_us > res.heuristic_us * (1 - self.args.min_gain):
            best_us, best = res.heuristic_us, heur
        res.best_us, res.best = best_us, best
        return best


def write_entry(folder: str, op: str, key: dict, index: int, cfg: Config, device_name: str) -> str:
    """Merge ``cfg`` at ``index`` into the tuned file of (op, key) in ``folder``; returns its path."""
    from vllm.kernel_configs import config_file_name

    path = os.path.join(folder, config_file_name(op, key, device_name))
    table = {}
    if os.path.isfile(path):
        with open(path) as f:
            table = json.load(f)
    table[str(index)] = dict(cfg)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: table[k] for k in sorted(table, key=int)}, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _randn(shape, std: float, dtype, device) -> torch.Tensor:
    return (torch.randn(shape, device=device) * std).to(dtype)


@dataclass
class Layer:
    """Random weights of one layer shape, and its LoRA weights per (rank, adapters)."""
    name: str
    H: int
    I: int
    E: int
    k: int
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    lora: dict = field(default_factory=dict)  # R -> (w13 A, w13 B, w2 A, w2 B) tuples of slices


def build_layer(shape, ranks: list[int], L: int, dtype, device, w13_layout: str = "slices") -> Layer:
    """``w13_layout`` "fused": the w13 LoRA of rank R is one slice of 2I columns at rank 2R (``FusedMoE3DWithLoRA``
    holding gate and up adapters side by side)."""
    name, H, I, E, k = shape
    w13 = torch.empty(E, 2 * I, H, dtype=dtype, device=device)
    w2 = torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):  # per expert: no full-size fp32 temporaries
        w13[e].copy_(_randn((2 * I, H), H ** -0.5, dtype, device))
        w2[e].copy_(_randn((H, I), I ** -0.5, dtype, device))
    layer = Layer(name, H, I, E, k, w13, w2)
    for R in ranks:  # stacked [S, L, E, ...] buffers, passed as slices, as FusedMoEWithLoRA does
        b_std = 0.5 * R ** -0.5
        S, R13, N13 = (1, 2 * R, 2 * I) if w13_layout == "fused" else (2, R, I)
        bufs = (_randn((S, L, E, R13, H), H ** -0.5, dtype, device),
                _randn((S, L, E, N13, R13), 0.5 * R13 ** -0.5, dtype, device),
                _randn((1, L, E, R, I), I ** -0.5, dtype, device), _randn((1, L, E, H, R), b_std, dtype, device))
        layer.lora[R] = tuple(tuple(b.unbind(0)) for b in bufs)
    return layer


def tune_gemms(t: Tuner, ly: Layer, M: int, x, tw, ti, act) -> list[Outcome]:
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import (fused_moe_gemm_reference,
                                                                         invoke_fused_moe_gemm)
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import align_for_experts

    pairs, E = M * ly.k, ly.E
    aligns: dict[int, object] = {}
    outs = {1: torch.empty(pairs, 2 * ly.I, dtype=t.dtype, device=t.device),
            2: torch.empty(pairs, ly.H, dtype=t.dtype, device=t.device)}
    args = {1: (x, ly.w13, ly.k), 2: (act, ly.w2, 1)}

    def run(stage: int, cfg: Config) -> torch.Tensor:
        bm = cfg["BLOCK_SIZE_M"]
        if bm not in aligns:
            aligns[bm] = align_for_experts(ti, bm, E)
        al, (a, w, top_k_in), out = aligns[bm], args[stage], outs[stage]
        invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                              num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=top_k_in,
                              topk_weights=tw, mul_routed_weight=stage == 2, config=space.launch_config(cfg))
        return out

    results, block_m = [], None
    keys = space.tuned_file_keys(ly.H, ly.I, E, ly.k, M, 0)
    for stage, kernel in ((1, "gemm_w13"), (2, "gemm_w2")):
        a, w, top_k_in = args[stage]
        N, K = w.shape[1], w.shape[2]
        heur = space.heuristic_gemm_config(pairs, E, N, K, top_k_in, t.dtype, t.on_gpu)
        if block_m is not None:
            heur["BLOCK_SIZE_M"] = block_m
        if t.on_gpu:
            cands = space.gemm_candidates(heur, pairs=pairs, E=E, N=N, K=K, elt_bytes=w.element_size(),
                                          fixed_block_m=block_m, limit=t.args.max_candidates)
        else:
            cands = space.interpreter_candidates(heur, "gemm", tune_block_m=stage == 1, limit=t.args.max_candidates)
        ref = fused_moe_gemm_reference(a, w, ti, top_k_in=top_k_in, topk_weights=tw, mul_routed_weight=stage == 2)
        res = Outcome(ly.name, M, kernel)
        best = t.search(res, cands, lambda c: run(stage, c), ref)
        block_m = best["BLOCK_SIZE_M"]
        if not res.note:
            op, key, index = keys[kernel]
            write_entry(t.args.out, op, key, index, best, t.device_name)
        results.append(res)
    return results


def tune_lora(t: Tuner, ly: Layer, M: int, R: int, x, tw, ti, act) -> list[Outcome]:
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch
    from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.triton_ops.moe_lora_config import use_small_batch_path

    L, E, pairs = t.args.num_loras, ly.E, M * ly.k
    mapping = (torch.arange(M, dtype=torch.int32) % L).to(t.device)
    enabled = torch.ones(L + 1, dtype=torch.int32, device=t.device)
    enabled[L] = 0
    fused = t.args.w13_layout == "fused"
    small = use_small_batch_path(pairs, E, L, 2 * R if fused else R)  # the layer's path: at its larger rank
    a13, b13, a2, b2 = ly.lora[R]
    aligns: dict[int, object] = {}
    outs = {1: torch.zeros(pairs, 2 * ly.I, dtype=t.dtype, device=t.device),
            2: torch.zeros(pairs, ly.H, dtype=t.dtype, device=t.device)}
    args = {1: (x, a13, b13, ly.k), 2: (act, a2, b2, 1)}

    def launch(stage: int, cfg: Config, out: torch.Tensor, fn=fused_moe_lora) -> torch.Tensor:
        bm = cfg["BLOCK_SIZE_M"]
        if not small and bm not in aligns:
            aligns[bm] = moe_lora_align_block_size(ti, mapping, num_experts=E, max_loras=L, block_size=bm,
                                                   adapter_enabled=enabled)
        a, la, lb_, top_k_in = args[stage]
        fn(out, a, la, lb_, topk_ids=ti, topk_weights=tw, token_lora_mapping=mapping, adapter_enabled=enabled,
           top_k_in=top_k_in, mul_routed_weight=stage == 2, alignment=None if small else aligns[bm],
           config=space.launch_config(cfg))
        return out

    def run(stage: int, cfg: Config) -> torch.Tensor:  # out += delta: start from zeros to compare deltas
        return launch(stage, cfg, outs[stage].zero_())

    results, block_m = [], None
    keys = space.tuned_file_keys(ly.H, ly.I, E, ly.k, M, R)
    if fused:  # the engine's lookup of the fused layout's one slice: N = 2I at rank 2R
        op13, key13, index13 = keys["lora_w13"]
        keys["lora_w13"] = (op13, dict(key13, N=2 * ly.I, R=2 * R), index13)
    for stage, kernel in ((1, "lora_w13"), (2, "lora_w2")):
        op, key, index = keys[kernel]
        K, N, S, R_op = key["K"], key["N"], 2 if stage == 1 and not fused else 1, key["R"]
        heur = space.heuristic_lora_config(op, pairs=pairs, E=E, L=L, R=R_op, K=K, N=N, S=S, dtype=t.dtype,
                                           device_name=t.device_name, small_batch=small)
        if block_m is not None:
            heur["BLOCK_SIZE_M"] = block_m
        if t.on_gpu:
            cands = space.lora_candidates(heur, sorted_path=not small, tune_block_m=stage == 1, R=R_op, K=K, N=N,
                                          limit=t.args.max_candidates)
        else:
            cands = space.interpreter_candidates(heur, "lora", tune_block_m=stage == 1 and not small,
                                                 limit=t.args.max_candidates)
        if not small:  # the split-K variant (--shrink-splits); the interpreter: its code path only
            split = space.split_candidates(heur, K=K, N=N, splits=t.args.shrink_splits)
            cands += split if t.on_gpu else split[:1]
        ref = launch(stage, heur, torch.zeros(outs[stage].shape, dtype=torch.float32, device=t.device),
                     fn=fused_moe_lora_torch)
        res = Outcome(ly.name, M, f"{kernel} R={R_op}" + (" (fused)" if fused and stage == 1 else ""))
        best = t.search(res, cands, lambda c: run(stage, c), ref)
        block_m = best["BLOCK_SIZE_M"]
        if not res.note:
            write_entry(t.args.out, op, key, index, best, t.device_name)
        results.append(res)
    return results


def tune(args: argparse.Namespace) -> tuple[list[Outcome], str]:
    """Run every case (tokens outer, shapes inner, so a budget cut leaves every shape covered)."""
    device = lb.pick_device(args.smoke)  # before any kernel module loads (it may set TRITON_INTERPRET)
    from vllm.model_executor.layers.fused_moe.router import fused_topk

    dtype = lb.DTYPES[args.dtype]
    t = Tuner(args, device, dtype)
    gpu = torch.cuda.get_device_name(device) if t.on_gpu else "cpu (interpreter)"
    torch.manual_seed(args.seed)
    shapes = [lb.SMOKE_SHAPE] if args.smoke else [lb.SHAPES[s] for s in args.shapes]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    os.makedirs(args.out, exist_ok=True)
    layers = [build_layer(s, args.ranks if "lora" in args.ops else [], args.num_loras, dtype, device, args.w13_layout)
              for s in shapes]
    kernels = (["gemm_w13", "gemm_w2"] if "gemm" in args.ops else []) + \
              [f"lora_{w} R={R}" for R in args.ranks for w in ("w13", "w2") if "lora" in args.ops]
    outcomes: list[Outcome] = []
    for M in tokens:
        for ly in layers:
            if t.out_of_time():
                outcomes += [Outcome(ly.name, M, kn, note="not run: budget") for kn in kernels]
                continue
            x = _randn((M, ly.H), 1.0, dtype, device)
            tw, ti = fused_topk(torch.randn(M, ly.E, device=device), ly.k, renormalize=True)
            act = _randn((M * ly.k, ly.I), 1.0, dtype, device)
            print(f"[{ly.name}] {M} tokens", flush=True)
            jobs = [("gemm", lambda: tune_gemms(t, ly, M, x, tw, ti, act))] if "gemm" in args.ops else []
            jobs += [(f"lora R={R}", lambda R=R: tune_lora(t, ly, M, R, x, tw, ti, act))
                     for R in (args.ranks if "lora" in args.ops else [])]
            for label, job in jobs:
                names = ["gemm_w13", "gemm_w2"] if label == "gemm" else [f"lora_{w} {label[5:]}" for w in ("w13", "w2")]
                if t.out_of_time():
                    outcomes += [Outcome(ly.name, M, n, note="not run: budget") for n in names]
                    continue
                try:
                    outcomes += job()
                except Exception as exc:  # e.g. out of memory: report it, go on with the other cases
                    outcomes += [Outcome(ly.name, M, n, note=f"error: {type(exc).__name__}: {str(exc)[:120]}")
                                 for n in names]
            for r in outcomes[-len(kernels):]:
                print(f"  {r.kernel:14s} heuristic {r.heuristic_us:9.1f} us  best {r.best_us:9.1f} us  "
                      f"({r.tried} tried, {r.errors} errors, {len(r.failed)} wrong){' partial' if r.partial else ''}"
                      f"  {r.best}", flush=True)
    return outcomes, gpu


def table(outcomes: list[Outcome], gpu: str, args: argparse.Namespace) -> str:
    lines = [f"## MoE tile tuning: {gpu}, {args.dtype}, LoRA {args.num_loras} adapters", "",
             "| shape | tokens | kernel | heuristic (us) | best (us) | gain | tried / errors / wrong | best config "
             "| GPU |",
             "|---|---:|---|---:|---:|---:|---|---|---|"]
    for r in outcomes:
        if r.note and not r.best:
            lines.append(f"| {r.shape} | {r.tokens} | {r.kernel} | - | - | - | {r.note} | - | {gpu} |")
            continue
        gain = r.heuristic_us / r.best_us if r.best_us > 0 else float("nan")
        cfg = " ".join(f"{k}={v}" for k, v in r.best.items())
        lines.append(f"| {r.shape} | {r.tokens} | {r.kernel} | {r.heuristic_us:.1f} | {r.best_us:.1f} | {gain:.2f}x "
                     f"| {r.tried} / {r.errors} / {len(r.failed)}{' (partial: budget)' if r.partial else ''} "
                     f"| `{cfg}` | {gpu} |")
    wrong = [(r, c, e) for r in outcomes for c, e in r.failed]
    lines += ["", "Notes:",
              "- Timed alone (alignment made outside), CUDA-graph replay with the L2 flushed, median; a winner "
              f"within {args.min_gain:.0%} of the heuristic is not taken (the heuristic's config is written).",
              "- gemm_w2 / lora_w2 are tuned with gemm_w13's / lora_w13's BLOCK_SIZE_M (the alignment they share); "
              "their heuristic column uses it too. LoRA tables hold no adapter count: tuned at the adapters above.",
              *[f"- {r.shape} {r.tokens} {r.kernel}: {r.note}" for r in outcomes if r.note and r.best],
              *[f"- WRONG OUTPUT: {r.shape} {r.tokens} {r.kernel} config {c}: normalised max error {e:.2e}"
                for r, c, e in wrong], ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    outcomes, gpu = tune(args)
    lb.emit(table(outcomes, gpu, args), os.path.join(args.out, "tune_moe.md"))
    return 1 if any(r.failed or r.note.startswith("error") for r in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
