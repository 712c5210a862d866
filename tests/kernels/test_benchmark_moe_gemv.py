"""benchmarks/kernels/benchmark_moe_gemv.py on the CPU interpreter: the A/B runs (checked against the reference,
the GEMV launched exactly where the routing is pairwise), its table and its sweep table."""
from __future__ import annotations

import sys

import pytest

import benchmarks.kernels.benchmark_moe_gemv as bg

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_smoke_run_reports_both_kernels(tmp_path, device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_gemv.py", "--smoke", "--bias", "--sweep", "--tokens", "1", "4",
                                      "--out", str(out)])
    bg.main()
    text = out.read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| smoke |")]
    layer_rows = [r for r in rows if len(r) == 11]
    assert [(r[1], r[3]) for r in layer_rows] == [("1", "yes"), ("4", "no")]  # 4 tokens: sorted, no GEMV
    sweep_rows = [r for r in rows if len(r) == 9]
    assert [(r[1], r[2]) for r in sweep_rows] == [("1", "w13"), ("1", "w2")]  # pairwise token counts only
    assert all('"GEMV": 1' in r[8] for r in sweep_rows)
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    assert fused_moe_gemm.GEMV_PAIRWISE is False  # the benchmark puts the switch back


def test_correctness_check_catches_a_wrong_gemv(device, monkeypatch):
    """The A/B refuses to time a GEMV whose output is wrong."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm

    real = fused_moe_gemm.invoke_fused_moe_gemv

    def wrong(a, w, out, **kw):
        real(a, w, out, **kw)
        out.mul_(1.5)

    monkeypatch.setattr(fused_moe_gemm, "invoke_fused_moe_gemv", wrong)
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_gemv.py", "--smoke", "--tokens", "1"])
    with pytest.raises(SystemExit, match="CORRECTNESS FAILED"):
        bg.main()
    assert fused_moe_gemm.GEMV_PAIRWISE is False  # put back on the way out too
