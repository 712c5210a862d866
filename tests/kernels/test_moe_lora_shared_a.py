"""The fused MoE LoRA op with both w13 slices reading one A (``FusedMoEWithLoRA.SHARE_W13_A``: a fused gate_up
adapter in the two-slice layout), on every path: the sorted one-launch kernel, its split-K shrink + expand, the
per-pair kernel, its prefetch variant and its two launches.

Both slices given as views of one A must give the bits of the same A given as two copies (distinct memory):
the one-launch kernels read it through ``stride_as`` 0, the two-launch ones shrink once (one slice of
partials, read by every slice's expand).  Both against the float64 loop reference too, with random data,
disabled slots and every local expert routed; the partials scratch is poisoned (NaN), so an expand reading a
slice the shrink did not write shows.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, F16, Case, _align, _config, _id, build, check
from tests.kernels.test_moe_lora_split import poisoned_partials  # noqa: F401 (a fixture)
from vllm.lora.ops.torch_ops.moe_lora import moe_lora_reference
from vllm.lora.ops.triton_ops import _fused_moe_lora_kernels as kern
from vllm.lora.ops.triton_ops import fused_moe_lora as op
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES = [
    Case(7, 2, 5, 3, 16, dtype=F16, disabled=(1,), every=True),
    Case(9, 4, 6, 2, 16, dtype=BF16, mul_w=True, every=True, config=(("num_n_splits", 2), ("block_size_n", 16))),
    Case(33, 2, 8, 4, 16, ranks=(16, 8, 4, 16), dtype=BF16, disabled=(2,), layout="view"),
]
# (path name, alignment?, shrink_split_k, PAIR_KERNEL)
PATHS = [("sorted", True, 1, None), ("sorted-split", True, 2, None), ("pair", False, 1, 0),
         ("pair-prefetch", False, 1, 1), ("pair-split", False, 1, 2)]


@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_one_a_for_both_slices(device, c, path, poisoned_partials, monkeypatch):
    partials = poisoned_partials
    name, sorted_path, split_k, pair_kernel = path
    if name == "pair-prefetch" and c.config:
        pytest.skip("the prefetch kernel takes its own tiles (one N tile per program)")
    monkeypatch.setattr(op, "PAIR_KERNEL", pair_kernel)
    grids = []
    real = kern.moe_lora_sorted_kernel

    class Spy:  # the sorted kernel's grids: one program per block and N split with one A, per slice too without
        def __getitem__(self, grid):
            grids.append(grid[0])
            return real[grid]

    monkeypatch.setattr(kern, "moe_lora_sorted_kernel", Spy())
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, _ = build(c, device)
    shared = (lora_a[0], lora_a[0])  # one A, read by both slices
    copies = tuple(torch.stack([lora_a[0], lora_a[0]]).unbind(0))  # the same values, stored twice
    assert copies[0].data_ptr() != copies[1].data_ptr()
    delta = moe_lora_reference(x, copies, lora_b, top_k_in=top_k_in, out_cols=out.shape[-1], **kw, **geo)
    assert delta.abs().sum() > 0
    cfg = dataclasses.replace(_config(c, device, c.M * c.top_k), shrink_split_k=split_k)
    al = _align(c, kw, cfg) if sorted_path else None
    start = out.clone()
    results = []
    for a in (copies, shared):
        out.copy_(start)
        partials.clear()
        fused_moe_lora(out, x, a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw, **geo)
        check(c, out, start, delta, parent)
        results.append(out.clone())
        if name in ("sorted-split", "pair-split"):
            # one slice of partials when the slices share A, one per slice otherwise
            assert [p.shape[1] for p in partials] == [1 if a is shared else 2]
        else:
            assert not partials, f"the {name} path launched the split kernels"
    assert torch.equal(results[0], results[1]), "one shared A changed the bits"
    if name == "sorted":
        assert len(grids) == 2 and grids[0] == 2 * grids[1], grids


def test_shared_views_make_a_zero_slice_stride():
    """What the launcher keys on: views of one A are slices 0 elements apart (stride_as 0)."""
    from vllm.lora.ops.triton_ops.moe_lora_checks import uniform_slice_stride

    a = torch.randn(2, 3, 4, 16, 8)
    assert uniform_slice_stride([a[0], a[0]]) == 0
    assert uniform_slice_stride(list(a.unbind(0))) == a[0].numel()
