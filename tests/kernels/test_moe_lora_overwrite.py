"""``fused_moe_lora(overwrite=True)``: out = the delta, for the fp32 delta buffers of ``experts/lora_overlap.py``.

``out`` starts full of NaN and must end bit for bit as the op gives from zeros (a pair without a delta, a
disabled slot, a token without an adapter, a non-local expert: exact zeros), on each per-pair kernel.  The
prefetch kernel and the two-launch split store their tiles themselves where the slices cover every column
(``_overwrites``); the default pair kernel, the sorted path and slices with gaps get ``out`` zeroed first."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, F16, F32, Case, _align, _config, _id, build
from tests.utils import assert_close
from vllm.lora.ops.triton_ops import fused_moe_lora as op

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES = [
    Case(1, 1, 4, 1, 8, S=1, mul_w=True),
    Case(7, 2, 5, 3, 16, dtype=F16, disabled=(1,), mul_w=True, every=True),
    Case(6, 4, 12, 2, 16, S=1, per_pair_x=True, mul_w=True, K=48, N=40, expert_map=True),
    Case(5, 2, 6, 2, 16, dtype=BF16, layout="separate", mul_w=True, every=True),
    Case(6, 2, 10, 3, 16, S=1, dtype=F16, expert_map=True, per_pair_x=True, mul_w=True, layout="3d"),
    Case(4, 2, 6, 2, 16, mapping="none"),
    Case(5, 2, 4, 2, 16, dtype=F16, K=80, N=40, mul_w=True, layout="view"),  # slices with gaps: zeroed first
]


def _overwrite_spy(monkeypatch):
    seen = []
    real = op._overwrites

    def spy(*a):
        seen.append(real(*a))
        return seen[-1]

    monkeypatch.setattr(op, "_overwrites", spy)
    return seen


@pytest.mark.parametrize("kernel", [0, 1, 2])
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_overwrite_equals_the_delta_from_zeros(device, c, kernel, monkeypatch):
    if c.dtype == BF16 and device.type == "cpu":
        c = Case(**{**c.__dict__, "dtype": F32})  # the interpreter truncates bf16
    monkeypatch.setattr(op, "PAIR_KERNEL", kernel)
    seen = _overwrite_spy(monkeypatch)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, delta = build(c, device)
    cfg = _config(c, device, c.M * c.top_k)
    zero = torch.zeros_like(out)
    op.fused_moe_lora(zero, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, **kw, **geo)
    poisoned = out.fill_(float("nan"))
    op.fused_moe_lora(poisoned, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, overwrite=True, **kw, **geo)
    assert not torch.isnan(poisoned).any(), "overwrite left elements unwritten"
    assert torch.equal(poisoned, zero), (poisoned.float() - zero.float()).abs().max()
    assert_close(poisoned.reshape(delta.shape).double().cpu(), delta.double(), c.dtype, name="delta")
    # the kernels themselves store every element where they can; otherwise out was zeroed first
    assert seen == [kernel in (1, 2) and c.layout != "view"], seen


def test_overwrite_on_the_sorted_path_zeroes_first(device, monkeypatch):
    c = Case(9, 2, 6, 2, 16, mul_w=True)
    seen = _overwrite_spy(monkeypatch)
    x, lora_a, lora_b, out, _, kw, geo, top_k_in, delta = build(c, device)
    cfg = _config(c, device, c.M * c.top_k)
    out.fill_(float("nan"))
    op.fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, config=cfg, alignment=_align(c, kw, cfg),
                      overwrite=True, **kw, **geo)
    assert seen == [False]
    assert_close(out.double().cpu(), delta.double(), c.dtype, name="delta")


def test_overwrites_needs_columns_tiled_exactly():
    """Slices must tile [0, cols): no offset, no gap between them, no columns left at the end."""
    assert op._overwrites(None, 8, 64, 16, [48, 48], 0, None, 96)
    assert op._overwrites(None, 8, 64, 16, [48, 40], 0, None, 88)
    assert op._overwrites(None, 8, 64, 16, [48, 48], 0, 48, 96)
    assert not op._overwrites(None, 8, 64, 16, [48, 48], 0, 51, 99)  # a gap between the slices
    assert not op._overwrites(None, 8, 64, 16, [48, 48], 5, None, 101)  # columns before the first
    assert not op._overwrites(None, 8, 64, 16, [48, 48], 0, None, 100)  # columns after the last
