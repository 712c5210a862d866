"""The static report of the 4-bit GEMMs (compiled for sm_90 without a GPU) and the benchmarks'
variant options, exercised on CPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, *, interpret: bool, timeout: int = 560) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_static_report_reads_the_main_loop_from_sass():
    pytest.importorskip("triton.backends.nvidia")
    proc = _run(["benchmarks/kernels/kernel_static_report.py", "--kernels", "int4", "mxfp4", "--tokens", "16",
                 "--shapes", "Mixtral-8x7B", "gpt-oss-20b", "--variants", "reshape (UNPACK 0)",
                 "split by code, scales after the dot (UNPACK 3)", "PTX decode", "portable, split-K auto"],
                interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [_cells(ln) for ln in proc.stdout.splitlines() if ln.startswith(("| int4", "| mxfp4"))]
    assert len(rows) == 8  # 2 GEMMs x 2 variants x 2 kernels
    for r in rows:
        regs, spill, shared = int(r[6]), int(r[7]), int(r[8].split()[0])
        instr, per_weight, pipelined = int(r[9].split()[0]), float(r[10]), r[13]
        assert 0 < regs <= 255 and spill == 0 and 0 < shared <= 232448, r
        assert instr > 0 and 1.0 < per_weight < 50.0 and pipelined == "yes", r
    by_variant = {(r[0], r[3], r[4]): float(r[10]) for r in rows}
    # the bit-placed, split-by-code int4 decode runs fewer instructions per weight than the reshape
    for gemm in ("w13", "w2"):
        assert by_variant[("int4", gemm, "split by code, scales after the dot (UNPACK 3)")] < \
            0.8 * by_variant[("int4", gemm, "reshape (UNPACK 0)")]
    assert all("(sass)" in r[9] for r in rows)


def _numpy_breaks_interpreter() -> bool:
    import numpy

    return tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4)


@pytest.mark.skipif(_numpy_breaks_interpreter(), reason="the smoke runs use Triton 3.6's CPU interpreter, which "
                    "numpy >= 2.4 breaks (a GPU machine keeps its own numpy); run on a CPU machine")
def test_benchmark_smoke_runs_time_the_variants():
    proc = _run(["benchmarks/kernels/benchmark_moe_mxfp4.py", "--smoke", "--tokens", "1", "--variants",
                 "portable+split-2", "split-auto"], interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "portable+split-2 (us, speed-up)" in proc.stdout and "split-auto (us, speed-up)" in proc.stdout
    proc = _run(["benchmarks/kernels/benchmark_moe_int4.py", "--smoke", "--tokens", "1", "--sweep"], interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "heuristic + UNPACK 3 (us)" in proc.stdout
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| smoke | 1 | w")]
    assert len(set(rows)) == 2 and all(" - |" not in r for r in rows)  # every mode ran (printed, then tabled)


def test_mxfp4_variant_reaches_the_kernel_config():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "kernels"))
    import torch

    from benchmarks.kernels.benchmark_moe_mxfp4 import _check_variant, config_variant
    from vllm.model_executor.layers.fused_moe.ops import mxfp4_moe_gemm as mod

    default = mod.get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16)  # the platform's (GPU: the GEMV)
    with config_variant("portable+split-4"):
        cfg = mod.get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16)
    assert cfg.split_k == 4 and cfg.decode_asm == 0
    assert mod.get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16) == default  # restored
    with config_variant("dot+split-2"):
        cfg = mod.get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16)
    assert cfg.gemv == 0 and cfg.split_k == 2
    with config_variant("gemv2"):
        cfg = mod.get_mxfp4_moe_config(4, 32, 2880, 2880, 4, torch.bfloat16)
    assert cfg.gemv == 2
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="unknown variant"):
        _check_variant("split-x")


def test_static_report_mxfp4_gemv_beats_the_dot_kernel():
    """The evidence behind GEMV_DECODE: at 1 token the FMA GEMV's K loop runs fewer instructions per
    weight than the dot kernel's with the PTX decode (and per row with 2 rows), within the register limit."""
    pytest.importorskip("triton.backends.nvidia")
    proc = _run(["benchmarks/kernels/kernel_static_report.py", "--kernels", "mxfp4", "--tokens", "1",
                 "--shapes", "gpt-oss-20b", "--variants", "PTX decode", "GEMV", "GEMV 2 rows"], interpret=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {(r[3], r[4]): r for r in (_cells(ln) for ln in proc.stdout.splitlines() if ln.startswith("| mxfp4"))}
    assert len(rows) == 6
    for gemm in ("w13", "w2"):
        dot = float(rows[(gemm, "PTX decode")][10])
        one, two = float(rows[(gemm, "GEMV")][10]), float(rows[(gemm, "GEMV 2 rows")][10])
        assert one < 0.8 * dot and two / 2 < 0.5 * dot, (one, two, dot)
        for v in ("GEMV", "GEMV 2 rows"):
            r = rows[(gemm, v)]
            assert int(r[6]) <= 255 and int(r[7]) == 0 and "(sass)" in r[9], r
