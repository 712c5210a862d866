"""benchmarks/trace_layers.py on a hand-built Chrome trace: layers cut at the anchor, per-position duration, gap
and exposed time (which sum to the period), the side stream's kernels, the comparison with a second trace."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import trace_layers as tl  # noqa: E402


def _trace(path, layers: int, b_dur: float, side: bool = True) -> str:
    """Stream 7: an embedding, then per layer qk (2 us), B (b_dur, starting 1 us before qk ends: PDL), C (3 us,
    1 us after B), then an LM head; stream 9: one side kernel per layer, 4-6 us after the layer's qk starts."""
    ev, t = [], 0.0

    def k(name, start, dur, stream=7):
        ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": dur, "args": {"stream": stream}})

    k("embedding_kernel", t, 5.0)
    t = 5.0
    for _ in range(layers):
        k("_qk_norm_rope_kernel", t, 2.0)
        if side:
            k("moe_lora_side<float>(int)", t + 4.0, 2.0, stream=9)
        k("dense_gemv_kernel", t + 1.0, b_dur)
        c0 = t + 1.0 + b_dur + 1.0
        k("_moe_sum_kernel", c0, 3.0)
        t = c0 + 3.0
    k("_qk_norm_rope_kernel", t, 2.0)
    k("lm_head_kernel", t + 2.0, 50.0)
    ev.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1})  # not a kernel
    p = os.path.join(path, f"trace_{b_dur}.json")
    with open(p, "w") as f:
        json.dump({"traceEvents": ev}, f)
    return p


def test_positions_sum_to_the_period(tmp_path):
    layers = tl.split_layers(tl.load_kernels(_trace(str(tmp_path), 5, 10.0)), "_qk_norm_rope_kernel")
    assert layers.names == ["_qk_norm_rope_kernel", "dense_gemv_kernel", "_moe_sum_kernel"]
    assert len(layers.layers) == 5 and layers.skipped == 0  # the last anchor starts no layer of its own
    assert layers.periods == [15.0] * 5  # qk 2, then B from 1 to 11, C from 12 to 15: next qk at 15
    rows = tl.position_stats(layers)
    assert [r["dur"] for r in rows] == [2.0, 10.0, 3.0]
    assert rows[1]["gap"] == -1.0 and rows[2]["gap"] == 1.0  # B started under qk; C 1 us after B
    assert rows[1]["exposed"] == 9.0 and rows[2]["exposed"] == 4.0 and rows[0]["exposed"] == 2.0
    assert sum(r["exposed"] for r in rows) == 15.0
    side = tl.side_stats(layers)
    assert side == [dict(name="moe_lora_side", stream=9, start=4.0, end=6.0, dur=2.0)]


def test_report_compares_with_a_base_trace(tmp_path):
    text = tl.report(_trace(str(tmp_path), 4, 8.0), "_qk_norm_rope_kernel", base=_trace(str(tmp_path), 4, 10.0))
    assert "median period 13.0 us (base 15.0 us)" in text
    row = next(line for line in text.splitlines() if "dense_gemv_kernel" in line)
    assert row.split("|")[-3:-1] == [" 9.0 ", " -2.0 "]  # base exposed 9, now 7
    assert "`moe_lora_side` | 9 | 4.0 | 6.0 | 2.0" in text


def test_a_trace_without_the_anchor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="found 0 times"):
        tl.split_layers(tl.load_kernels(_trace(str(tmp_path), 3, 5.0)), "no_such_kernel")
