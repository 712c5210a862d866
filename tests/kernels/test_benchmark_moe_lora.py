"""benchmarks/kernels/benchmark_moe_lora.py: the separate shrink/expand baseline (issue 11) is what it
claims and correct, and the smoke run reports every (rank, adapters) combination with its columns."""
from __future__ import annotations

import sys

import pytest
import torch

import benchmarks.kernels.benchmark_moe_lora as lb

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("beside", [False, True])  # the LoRA deltas in buffers of their own (lora_overlap)
@pytest.mark.parametrize("M", [1, 9])  # small-batch per-pair path, sorted path (4 adapters, 8 experts, top-2)
def test_baseline_launches_shrink_then_expand_and_matches_the_reference(M, beside, device, monkeypatch):
    from tests.lora.lora_moe_harness import poisoned_delta_buffer
    from vllm.lora.ops.triton_ops import fused_moe_lora as ops
    from vllm.model_executor.layers.fused_moe.experts import lora_overlap

    if beside:  # the seams overwrite NaN-poisoned buffers (on the per-pair path; the sorted one stays in place)
        monkeypatch.setattr(lora_overlap, "DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(lora_overlap, "delta_buffer", poisoned_delta_buffer)

    dtype = torch.bfloat16
    case = lb.build_case(lb.SMOKE_SHAPE, dtype, device, 16, 4, 16, 0)
    x, _, tw, ti, slots = lb.make_inputs(case, M, 4, dtype, device, 0)
    case.set_mapping(slots)
    calls = []
    for name in ("fused_moe_lora", "moe_lora_shrink", "moe_lora_expand"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw))
    qm = case.layer.quant_method
    out = qm.apply(case.layer, x, tw, ti, lora_context=case.baseline[0])
    assert calls == ["moe_lora_shrink", "moe_lora_expand"] * 2  # after GEMM1, after GEMM2; never the fused op
    ref = lb.reference(case, x, tw, ti, slots, True)
    assert lb.norm_err(out, ref) < lb.TOLERANCE[dtype]
    assert lb.norm_err(lb.reference(case, x, tw, ti, slots, False), ref) > 10 * lb.TOLERANCE[dtype]  # LoRA matters
    calls.clear()
    qm.apply(case.layer, x, tw, ti, lora_context=case.layer._lora_context)
    assert calls == ["fused_moe_lora"] * 2  # ours: one fused launch per GEMM


def test_smoke_run_reports_each_rank_and_adapter_count(tmp_path, device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_lora.py", "--smoke", "--tokens", "1", "--ranks", "16", "32",
                                      "--num-loras", "2", "4", "--check-tokens", "5", "--out", str(out)])
    lb.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| smoke |")]
    assert [tuple(c.strip() for c in r.split("|")[3:5]) for r in rows] == [("16", "2"), ("16", "4"), ("32", "2"),
                                                                           ("32", "4")]
    assert len({r.split("|")[7] for r in rows}) == 1  # the base is timed once per shape and token count
    assert "baseline LoRA (us)" in out.read_text() and "ours / baseline" in out.read_text()


def test_the_kernel_profile_lists_the_lora_only_work(tmp_path, device, monkeypatch):
    """profile_moe_lora.py --smoke: one table per token count, base and LoRA columns, and the LoRA call runs
    more operators than the base call (so the difference column has something to attribute)."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    import benchmarks.kernels.profile_moe_lora as prof

    out = tmp_path / "p.md"
    monkeypatch.setattr(sys, "argv", ["profile_moe_lora.py", "--smoke", "--tokens", "5", "--out", str(out)])
    prof.main()
    text = out.read_text()
    assert "## smoke, 5 tokens" in text and "sum of device time" in text
    rows = [r for r in text.splitlines() if r.startswith("| `")]
    calls = [tuple(float(c) for c in r.split("|")[2].split("/")) for r in rows]
    assert any(lora > b for b, lora in calls)  # the LoRA call's extra work is listed (on a GPU: its own kernels)


def test_profile_drops_the_flush_kernel_only():
    """The L2 flush's fill kernel (CUDA names it ``...FillFunctor...``) is not counted as a layer kernel; the
    layer's kernels are (the first GPU run listed the flush as 57.7 us on both sides)."""
    from benchmarks.kernels.profile_moe_lora import is_flush_kernel

    assert is_flush_kernel("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                           "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)")
    for name in ("_fused_moe_gemm_kernel", "moe_lora_sorted_kernel", "_scatter_kernel",
                 "Memcpy DtoD (Device -> Device)"):
        assert not is_flush_kernel(name)


def test_switch_flags_set_the_modules(monkeypatch):
    """benchmark_moe_lora.py's module switches (moe_lora_variants.SWITCHES): each flag sets its attribute, with
    the attribute's type; unset flags leave the modules alone."""
    import argparse

    from benchmarks.kernels import moe_lora_variants as mv
    from vllm.lora.ops.triton_ops import fused_moe_lora as f
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    for attr in ("PAIR_KERNEL", "PAIR_SPLIT_FANOUT", "PAIR_SPLIT_MIN_WORK"):
        monkeypatch.setattr(f, attr, getattr(f, attr))
    for attr in ("SMALL_BATCH_PAIRS_FACTOR", "WIDE_RANK_PAIR_TILES"):
        monkeypatch.setattr(mc, attr, getattr(mc, attr))
    p = argparse.ArgumentParser()
    mv.add_switch_flags(p)
    before = mc.SMALL_BATCH_PAIRS_FACTOR
    done = mv.apply_switch_flags(p.parse_args(["--pair-kernel", "0", "--pair-split-fanout", "0",
                                               "--pair-split-min-work", "0", "--wide-rank-pair-tiles", "0"]))
    assert done == ["WIDE_RANK_PAIR_TILES=False", "PAIR_KERNEL=0", "PAIR_SPLIT_MIN_WORK=None",
                    "PAIR_SPLIT_FANOUT=False"]
    assert f.PAIR_KERNEL == 0 and f.PAIR_SPLIT_FANOUT is False and f.PAIR_SPLIT_MIN_WORK is None
    assert mc.WIDE_RANK_PAIR_TILES is False and mc.SMALL_BATCH_PAIRS_FACTOR == before
    mv.apply_switch_flags(p.parse_args(["--pair-path-factor", "2", "--pair-split-fanout", "1"]))
    assert mc.SMALL_BATCH_PAIRS_FACTOR == 2.0 and f.PAIR_SPLIT_FANOUT is True


def test_fused_w13_layout_checks_out(device):
    """--w13-layout fused: FusedMoE3DWithLoRA, one w13 slice of 2I rows at twice the rank, w2 at the rank, against
    the fp32 reference; its LoRA bytes count the fused slice."""
    from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA

    dtype = torch.bfloat16
    case = lb.build_case(lb.SMOKE_SHAPE, dtype, device, 8, 4, 16, 0, w13_layout="fused")
    assert type(case.lora_layer) is FusedMoE3DWithLoRA and "fused w13 at rank 16" in case.name
    (a,), (b,) = case.adapters[0].w13_a, case.adapters[0].w13_b
    assert a.shape[1:] == (16, case.H) and b.shape[1:] == (2 * case.I, 16) and case.adapters[0].w2_a.shape[1] == 8
    assert "LoRA effect" in lb.check(case, 9, 4, dtype, device, 0)  # exits on a mismatch
    x, _, tw, ti, slots = lb.make_inputs(case, 9, 4, dtype, device, 0)
    _, pairs, _, lora_bytes = lb.traffic(case, ti, slots, 8)
    assert lora_bytes == pairs * (16 * case.H + 2 * case.I * 16 + 8 * (case.H + case.I)) * 2


def test_peft_w13_layout_is_the_engines_and_reads_one_a(device):
    """--w13-layout peft: the engine's layer for peft's fused gate_up adapters - FusedMoEWithLoRA, two slices of the
    rank reading one A (``SHARE_W13_A``) - against the fp32 reference; its LoRA bytes count A once."""
    from vllm.lora.layers.fused_moe import FusedMoEWithLoRA

    dtype = torch.bfloat16
    case = lb.build_case(lb.SMOKE_SHAPE, dtype, device, 8, 4, 16, 0, w13_layout="peft")
    assert type(case.lora_layer) is FusedMoEWithLoRA and case.lora_layer.w13_a_shared and "one A" in case.name
    (a,), (b,) = case.adapters[0].w13_a, case.adapters[0].w13_b
    assert a.shape[1:] == (8, case.H) and b.shape[1:] == (2 * case.I, 8)
    assert "LoRA effect" in lb.check(case, 9, 4, dtype, device, 0)  # exits on a mismatch
    x, _, tw, ti, slots = lb.make_inputs(case, 9, 4, dtype, device, 0)
    _, pairs, _, lora_bytes = lb.traffic(case, ti, slots, 8)
    assert lora_bytes == pairs * (8 * case.H + 2 * case.I * 8 + 8 * (case.H + case.I)) * 2
