"""The MoE LoRA op on the experts' own alignment (``moe_lora_expert_blocks.py``, prototype): each expert block
loops over the adapter slots among its rows.

Against the float64 per-pair loop reference and bit for bit against the sorted one-launch op (the same fp32
shrink and bf16x3 expand per row), on the cases of ``test_fused_moe_lora.py`` without an expert map or a
strided output view: disabled slots, tokens without an adapter, routed weights, per-pair x, one or two
slices (in one launch, per slice, or reading one A), every local expert with pairs, and expert blocks of 16
and 32 rows holding several slots each.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_fused_moe_lora import CASES, Case, _align, _config, _id, build, check
from tests.utils import assert_close
from vllm.lora.ops.torch_ops.moe_lora import moe_lora_reference
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
from vllm.lora.ops.triton_ops.moe_lora_expert_blocks import fused_moe_lora_expert_blocks
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EB_CASES = [c for c in CASES if not c.expert_map and c.layout != "view" and c.M * c.top_k <= 400]


def _run(c: Case, device, block: int, a=None, per_slot: bool = True):
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    a = lora_a if a is None else a(lora_a)
    if a is not lora_a:
        copies = tuple(t.clone() for t in a)
        delta = moe_lora_reference(x, copies, lora_b, top_k_in=top_k_in, out_cols=out.shape[-1], **kw, **geo)
    start = out.clone()
    cfg = _config(c, device, c.M * c.top_k)
    align = moe_align_block_size(kw["topk_ids"], block, c.E, use_triton=False)
    fused_moe_lora_expert_blocks(out, x, a, lora_b, align=align, topk_ids=kw["topk_ids"],
                                 topk_weights=kw["topk_weights"], token_lora_mapping=kw["token_lora_mapping"],
                                 adapter_enabled=kw["adapter_enabled"], top_k_in=top_k_in,
                                 mul_routed_weight=kw["mul_routed_weight"], config=cfg, program_per_slot=per_slot)
    check(c, out, start, delta, parent)
    sorted_out = start.clone()
    cfg16 = dataclasses.replace(cfg, block_size_m=16)
    fused_moe_lora(sorted_out, x, a, lora_b, top_k_in=top_k_in, alignment=_align(c, kw, cfg16), config=cfg16,
                   **kw, **geo)
    return out, sorted_out, c


@pytest.mark.parametrize("per_slot", [True, False], ids=["program-per-slot", "slot-loop"])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("c", EB_CASES, ids=_id)
def test_expert_blocks_match_reference_and_sorted_op(device, c, block, per_slot):
    out, sorted_out, c = _run(c, device, block, per_slot=per_slot)
    assert_close(out, sorted_out, c.dtype, name="vs the sorted op")


@pytest.mark.parametrize("per_slot", [True, False], ids=["program-per-slot", "slot-loop"])
@pytest.mark.parametrize("c", [c for c in EB_CASES if c.S == 2 and c.layout == "flat"], ids=_id)
def test_slices_reading_one_a(device, c, per_slot):
    out, sorted_out, c = _run(c, device, 16, a=lambda lora_a: (lora_a[0], lora_a[0]), per_slot=per_slot)
    assert_close(out, sorted_out, c.dtype, name="vs the sorted op")


def test_alignment_of_other_pairs_is_refused(device):
    c = EB_CASES[1]
    x, lora_a, lora_b, out, _, kw, _, top_k_in, _ = build(c, device)
    align = moe_align_block_size(kw["topk_ids"][:-1], 16, c.E, use_triton=False)
    with pytest.raises(ValueError, match="alignment was made for"):
        fused_moe_lora_expert_blocks(out, x, lora_a, lora_b, align=align, topk_ids=kw["topk_ids"],
                                     topk_weights=kw["topk_weights"], token_lora_mapping=kw["token_lora_mapping"],
                                     adapter_enabled=kw["adapter_enabled"], top_k_in=top_k_in,
                                     config=_config(c, device, c.M * c.top_k))


def test_compiles_for_hopper_without_spills():
    """sm_90 compile at Qwen3-30B-A3B's w13 / w2 (a subprocess without the interpreter:
    moe_lora_expert_block_compile.py): 12 specialisations, none spills."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/moe_lora_expert_block_compile.py").count("ok ") == 12


def test_benchmark_smoke_run(device, monkeypatch, tmp_path):
    """benchmarks/kernels/benchmark_moe_lora_expert_blocks.py --smoke: checks both variants against the sorted
    path (it exits on a mismatch) and writes one row."""
    import sys

    if device.type != "cpu":
        pytest.skip("smoke mode runs on the CPU interpreter")
    from benchmarks.kernels import benchmark_moe_lora_expert_blocks as bench

    out = tmp_path / "eb.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_lora_expert_blocks.py", "--smoke", "--out", str(out)])
    bench.main()
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| 5 |")]
    assert len(rows) == 1 and "CPU (interpreter)" in rows[0]
