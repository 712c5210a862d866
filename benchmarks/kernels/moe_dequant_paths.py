"""The 4-bit experts' two paths in ``benchmark_moe_int4.py`` / ``benchmark_moe_mxfp4.py`` (``--path``,
``--compare-paths``; ``fused_moe/experts/dequant_path.py``): choosing the path, the table of both paths
with the crossover, and the dequantisers (``ops/int4_dequant.py``, ``ops/mxfp4_expert_dequant.py``)
timed alone: per GEMM, one scratch's worth of experts (``dequant_path.experts_per_chunk``) with a few
tiles, as GB/s (bytes read + written) and % of the copy-bandwidth peak.  The dequant path is memory
bound, so this shows how far it is from the roofline and which tile to make the default."""
from __future__ import annotations

import argparse
import importlib
from typing import Callable, Optional

import torch


def set_path(path: str) -> None:
    """Route the 4-bit experts through ``path`` ("auto": the thresholds), inside CUDA-graph captures too
    (the benchmarks time graph replays of what an eager prefill would run)."""
    from vllm.model_executor.layers.fused_moe.experts import dequant_path

    dequant_path.IN_CUDA_GRAPHS = True
    dequant_path.FORCE_PATH = None if path == "auto" else path


def add_lora_deltas_flag(p: argparse.ArgumentParser) -> None:
    """``--lora-deltas 0 / 1``: the 4-bit experts' ``lora_deltas_beside`` (``experts/lora_overlap.py``)."""
    p.add_argument("--lora-deltas", type=int, default=None, choices=[0, 1],
                   help="the experts' lora_deltas_beside: 1 = the LoRA deltas in fp32 buffers on a side stream beside "
                        "the 4-bit GEMMs, 0 = in place after them")


def set_lora_deltas(value: Optional[int], module: str, cls: str) -> None:
    """Set ``lora_deltas_beside`` of the experts class ``cls`` of ``fused_moe/experts/<module>.py`` when ``value`` is
    given."""
    if value is not None:
        mod = importlib.import_module(f"vllm.model_executor.layers.fused_moe.experts.{module}")
        setattr(getattr(mod, cls), "lora_deltas_beside", bool(value))


def on_path(path: str, fn: Callable) -> Callable:
    """fn, run with the experts path set to ``path`` (host-side only: a captured graph keeps that path)."""
    def run():
        set_path(path)
        return fn()
    return run


def paths_table(rows: list[dict], kind: str, bf16_label: str) -> str:
    """The base call on each forced path (rows with ``kernel`` / ``dequant`` times), and per shape the token
    count from which dequant + bf16 wins at every larger count timed."""
    lines = [f"| shape | tokens | pairs / expert | {bf16_label} (us) | {kind} kernel (us) | {kind} dequant + bf16 (us) "
             "| kernel / dequant |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['pairs_per_expert']:.3g} | {r['bf16']:.1f} "
                     f"| {r['kernel']:.1f} | {r['dequant']:.1f} | {r['kernel'] / r['dequant']:.2f} |")
    lines.append("")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["tokens"])
        wins = [i for i in range(len(mine)) if all(r["dequant"] < r["kernel"] for r in mine[i:])]
        if wins:
            r = mine[wins[0]]
            lines.append(f"- {shape}: dequant + bf16 is faster from {r['tokens']} tokens "
                         f"({r['pairs_per_expert']:.3g} pairs per expert) on")
        else:
            lines.append(f"- {shape}: the in-register kernel is faster at the largest token count timed")
    return "\n".join(lines)


# (block_n, block_k); the first is each dequantiser's default (int4 64 x 128, MXFP4 32 x 256)
INT4_TILES = [(64, 128), (32, 256), (128, 64), (64, 64), (128, 128), (32, 128)]
MXFP4_TILES = [(32, 256), (64, 128), (16, 512), (64, 256), (32, 128), (128, 64)]


def dequant_rows(shape: str, stages: list[tuple[str, int, int, int, int, Callable]],
                 tiles: list[tuple[int, int]], dtype: torch.dtype, device: torch.device,
                 timer: Callable[[Callable], float], peak: float) -> list[str]:
    """Markdown rows ``| shape | GEMM | experts | tile | us | GB/s | % of peak |``.

    stages: (GEMM label, E, N, K, bytes read per expert, run(out, e0, e1, block_n, block_k)).
    timer(fn) -> microseconds.  On CPU (the interpreter picks its own tiles) only the first tile runs.
    """
    from vllm.model_executor.layers.fused_moe.experts.dequant_path import experts_per_chunk

    rows = []
    for label, E, N, K, read_per_expert, run in stages:
        n_e = experts_per_chunk(E, N, K, dtype)
        out = torch.empty(n_e, N, K, dtype=dtype, device=device)
        moved = n_e * (read_per_expert + N * K * torch.finfo(dtype).bits // 8)
        for bn, bk in tiles if device.type == "cuda" else tiles[:1]:
            try:
                us = timer(lambda: run(out, 0, n_e, bn, bk))
            except Exception as exc:  # e.g. a tile the compiler refuses
                rows.append(f"| {shape} | {label} | {n_e} | {bn} x {bk} | failed: {type(exc).__name__} | | |")
                continue
            gbs = moved / (us * 1e-6) / 1e9
            rows.append(f"| {shape} | {label} | {n_e} of {E} | {bn} x {bk} | {us:.1f} | {gbs:.4g} "
                        f"| {100 * moved / peak / (us * 1e-6):.0f} % |")
            print(rows[-1], flush=True)
    return rows


DEQUANT_HEADER = ["| shape | GEMM | experts | tile (N x K) | us | GB/s | % of peak |",
                  "|---|---|---:|---|---:|---:|---:|"]
