"""The sorted MoE LoRA kernel with its block's ids loaded in one round trip before its early exits
(``fused_moe_lora.SORTED_EARLY_IDS``, the kernel's ``EARLY_IDS``).

Blocks past the padded total and blocks of no virtual expert (-1) must still write nothing, and every real
block its pairs: each case is checked against the float64 loop reference - out starts random, entries without a
delta must come back bit-identical, a strided out view must not be written outside - and bit for bit against
the same launch with the switch off (it moves loads, not arithmetic).  Covered: one and two slices per program,
N splits, several K tiles, the routed weight, disabled slots and empty adapters (blocks of -1), an expert map,
the shrink-only and expand-only launches, and on CUDA the real Qwen3-30B-A3B widths at 2048 pairs.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_fused_moe_lora import BF16, F16, F32, Case, _align, _config, _id, build, check
from vllm.lora.ops.triton_ops import _fused_moe_lora_kernels as kern
from vllm.lora.ops.triton_ops import fused_moe_lora as op
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora, moe_lora_expand, moe_lora_shrink

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES = [
    Case(7, 2, 5, 3, 16, dtype=F16, disabled=(1,), mul_w=True, every=True),
    Case(9, 2, 6, 2, 16, dtype=BF16, layout="separate", mul_w=True, every=True),
    Case(12, 2, 10, 3, 16, S=1, dtype=F16, expert_map=True, per_pair_x=True, mul_w=True, layout="3d"),
    Case(33, 8, 16, 4, 16, dtype=BF16, mapping="one", expert_map=True, every=True),
    Case(40, 2, 8, 4, 16, ranks=(16, 8, 4, 16), dtype=BF16, disabled=(2,), mul_w=True, layout="view"),
    Case(33, 2, 6, 2, 16, mapping="none"),
    # 5 N tiles over 4 splits; K in 5 tiles, the last one partial
    Case(20, 2, 4, 2, 16, dtype=F16, K=80, N=72, mul_w=True, layout="view",
         config=(("block_size_k", 16), ("block_size_n", 16), ("num_n_splits", 4))),
    Case(24, 2, 6, 3, 8, S=1, dtype=F32, K=48, N=40, every=True, config=(("block_size_n", 16),)),
]


def _run(c, device, monkeypatch, *, on: bool, shared_a: bool = False, split: bool = False):
    """(out after the op, its start, the reference delta, the out parent) with the switch ``on``; the kernel's
    launches are counted, and each must have taken the switch as asked."""
    monkeypatch.setattr(op, "SORTED_EARLY_IDS", on)
    seen = []
    real = kern.moe_lora_sorted_kernel

    class Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kw):
                seen.append(kw["EARLY_IDS"])
                return launch(*args, **kw)
            return run

    monkeypatch.setattr(kern, "moe_lora_sorted_kernel", Spy())
    torch.manual_seed(0)
    x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
    if shared_a:  # both slices read one A (a fused gate_up adapter): one program expands both
        lora_a = (lora_a[0], lora_a[0])
        from vllm.lora.ops.torch_ops.moe_lora import moe_lora_reference

        delta = moe_lora_reference(x, lora_a, lora_b, top_k_in=top_k_in, out_cols=out.shape[-1], **kw, **geo)
    start = out.clone()
    cfg = _config(c, device, c.M * c.top_k)
    al = _align(c, kw, cfg)
    if split:
        sk = {k: kw[k] for k in ("topk_ids", "token_lora_mapping", "adapter_enabled", "expert_map")}
        shrunk = moe_lora_shrink(x, lora_a, top_k_in=top_k_in, alignment=al, config=cfg, **sk)
        n_shrink = len(seen)
        moe_lora_expand(out, shrunk, lora_b, alignment=al, config=cfg, **kw, **geo)
        assert n_shrink and seen == [on] * len(seen), seen  # the shrink-only and expand-only launches as asked
    else:
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw, **geo)
        assert seen and all(s == on for s in seen), seen
    return out, start, delta, parent


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_early_ids_match_reference_and_bits(device, c, monkeypatch):
    out_on, start, delta, parent = _run(c, device, monkeypatch, on=True)
    check(c, out_on, start, delta, parent)
    out_off, start_off, _, _ = _run(c, device, monkeypatch, on=False)
    assert torch.equal(start, start_off)
    assert torch.equal(out_on, out_off), "loading the ids early changed the bits"


@pytest.mark.parametrize("c, mode", [(CASES[0], "shared_a"), (CASES[6], "shared_a"), (CASES[1], "split"),
                                     (CASES[6], "split")], ids=lambda v: v if isinstance(v, str) else _id(v))
def test_shared_a_and_the_two_launch_ops(device, c, mode, monkeypatch):
    """Both w13 slices from one A (one program expands both), and the shrink-only + expand-only launches."""
    kw = {mode: True}
    out_on, start, delta, parent = _run(c, device, monkeypatch, on=True, **kw)
    check(c, out_on, start, delta, parent)
    out_off, _, _, _ = _run(c, device, monkeypatch, on=False, **kw)
    assert torch.equal(out_on, out_off)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("w2", [False, True], ids=["w13", "w2"])
def test_cuda_real_width_bits(w2, monkeypatch):
    """Qwen3-30B-A3B's widths at 2048 pairs (a batch-256 decode step; w13 as peft's fused gate_up adapters load:
    two slices of one A at rank 32), the engine's tiles (tuned where shipped): same bits either way."""
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

    device = torch.device("cuda")
    c = Case(256, 8, 128, 4, 16 if w2 else 32, S=1 if w2 else 2, dtype=BF16, K=768 if w2 else 2048, N=2048 if w2 else 768,
             per_pair_x=w2, mul_w=w2, every=True)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(op, "SORTED_EARLY_IDS", on)
        torch.manual_seed(0)
        x, lora_a, lora_b, out, parent, kw, geo, top_k_in, delta = build(c, device)
        if not w2:
            lora_a = (lora_a[0], lora_a[0])
            from vllm.lora.ops.torch_ops.moe_lora import moe_lora_reference

            delta = moe_lora_reference(x, lora_a, lora_b, top_k_in=top_k_in, out_cols=out.shape[-1], **kw, **geo)
        start = out.clone()
        cfg = get_moe_lora_config("fused_moe_lora_w2" if w2 else "fused_moe_lora_w13", num_pairs=c.M * c.top_k,
                                  num_experts=c.E, max_loras=c.L, rank=c.R, K=c.K, N=c.N, num_slices=c.S,
                                  dtype=c.dtype, use_tuned_config=True, device_name=torch.cuda.get_device_name())
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=_align(c, kw, cfg), config=cfg,
                       **kw, **geo)
        torch.cuda.synchronize()
        check(c, out, start, delta, parent)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
