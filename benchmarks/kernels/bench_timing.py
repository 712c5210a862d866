"""Timing and reporting helpers shared by the kernel benchmarks (``benchmark_moe_lora.py`` and the others
import them from there or from here): CUDA-graph replay timing with the L2 flushed, CPU wall clock, the
device copy bandwidth, the normalised max error, and table output."""
from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FLUSH_BYTES = 256 << 20
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _culprit(exc: BaseException) -> str:
    """file:line of the innermost vllm frame of an exception (where capture broke)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}vllm{os.sep}" in f.filename]
    f = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{os.path.relpath(f.filename, _ROOT)}:{f.lineno} `{(f.line or '').strip()}`"


def time_cuda(fn, flush: torch.Tensor, reps: int, use_graph: bool) -> tuple[float, bool, str]:
    """Median microseconds of fn over reps replays with a cold L2; (time, graph used, note)."""
    for _ in range(3):
        out = fn()  # compiles kernels, grows workspaces: nothing may allocate or compile during capture
    torch.cuda.synchronize()
    run, graph, note = fn, None, ""
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                g_out = fn()
            graph.replay()
            torch.cuda.synchronize()
            if norm_err(g_out, out.float()) > 1e-3:
                note = "graph replay output differs from the eager output"
            run = graph.replay
        except Exception as exc:  # e.g. a host sync or a host-to-device copy inside the op
            graph, note = None, f"capture failed at {_culprit(exc)}: {type(exc).__name__}: {str(exc)[:100]}"
            torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()  # evict the L2 (256 MB written) before each timed replay
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    us = statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)
    del graph
    return us, run is not fn, note


def time_cpu(fn, reps: int) -> tuple[float, bool, str]:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), False, ""


def peak_bandwidth(device) -> float:
    """Bytes/s of a large copy, counting bytes read + written."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        us, _, _ = time_cuda(lambda: dst.copy_(src), torch.empty(0, device=device), 20, use_graph=False)
    else:
        us, _, _ = time_cpu(lambda: dst.copy_(src), 5)
    return 2 * n / (us * 1e-6)


def add_run_args(p, *, smoke: str, out: str = "also write the tables (markdown) here") -> None:
    """The options every GEMV benchmark takes: replays, eager timing, the CPU smoke run, seed, output file."""
    p.add_argument("--reps", type=int, default=None, help="timed replays per case (default 100; CPU: 2)")
    p.add_argument("--no-graph", action="store_true", help="time eagerly, without CUDA graphs")
    p.add_argument("--smoke", action="store_true", help=f"{smoke}; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=out)


@dataclass
class RunSetup:
    """What a benchmark run with ``add_run_args``'s options times with: ``timed(fn)`` (us: CUDA-graph replay
    with the L2 flushed, median of ``reps``; on CPU the wall clock), the copy bandwidth and the device's name."""

    timed: Callable[[Callable[[], object]], float]
    reps: int
    bandwidth: float
    gpu: str


def run_setup(args, device: torch.device) -> RunSetup:
    """The timer of ``args`` (``--reps``, default 100 on CUDA and 2 on CPU; ``--no-graph``) on ``device``."""
    reps = args.reps or (2 if device.type == "cpu" else 100)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def timed(fn) -> float:
        if device.type == "cuda":
            return time_cuda(fn, flush, reps, use_graph=not args.no_graph)[0]
        return time_cpu(fn, reps)[0]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    return RunSetup(timed, reps, peak_bandwidth(device), gpu)


def emit(text: str, out: Optional[str]) -> None:
    """Print a benchmark's tables and, with ``--out``, write them to that file too."""
    print("\n" + text)
    if out:
        with open(out, "w") as f:
            f.write(text.rstrip("\n") + "\n")
        print(f"wrote {out}")


def pick_device(smoke: bool) -> torch.device:
    """CUDA; without it only a smoke run, on CPU under the Triton interpreter (set before kernels load)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        sys.exit("no CUDA device: only --smoke runs on CPU (Triton interpreter)")
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")
