"""The MoE layer with LoRA through the one-pass alignment (``moe_align_with_lora``, issue 11 "align once").

TritonExperts makes the expert alignment and the (adapter, expert) alignment of the step's LoRA in the
same three launches when both sort, and hands the LoRA part to the w13 seam.  Checked here: the layer
output equals, bit for bit, the one of the previous path (two separate aligns), and the fp32 loop
reference; the wrapper then never aligns itself; and where the one-pass align does not apply (LoRA on
its small-batch path, no adapter in the step, the base on ``pairwise_alignment``, the base on a larger
block than the LoRA kernels) nothing changes.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.ops import moe_lora_align
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_overlap
from vllm.model_executor.layers.fused_moe.experts.triton_experts import TritonExperts
from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm


class _Calls:
    """Counts the one-pass aligns and the wrapper's own LoRA aligns of the forwards that follow."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, use_triton: bool) -> None:
        self.one_pass = 0
        self.wrapper = 0
        combined, wrapper_align = moe_lora_align.moe_align_with_lora, PunicaWrapperGPU._align

        @functools.wraps(combined)
        def counted_combined(*args, **kwargs):
            self.one_pass += 1
            kwargs.setdefault("use_triton", use_triton)  # the Triton kernels also on CPU (interpreter)
            return combined(*args, **kwargs)

        def counted_align(wrapper, *args, **kwargs):
            self.wrapper += 1
            return wrapper_align(wrapper, *args, **kwargs)

        monkeypatch.setattr(moe_lora_align, "moe_align_with_lora", counted_combined)
        monkeypatch.setattr(PunicaWrapperGPU, "_align", counted_align)


@pytest.fixture(autouse=True)
def _in_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass align is what these tests check; with the LoRA alignment made beside GEMM1 instead
    (``lora_overlap.ALIGN_BESIDE``, on by default: tests/lora/test_moe_lora_align_beside.py) it is not used."""
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", False)


def _harness(device, *, E=16, top_k=4, max_loras=3, seed=11, **kw) -> Harness:
    h = Harness(E=E, top_k=top_k, H=32, I=32, backend="triton", device=device, max_loras=max_loras, max_rank=16,
                seed=seed, **kw)
    for slot, rank in zip(range(max_loras), (16, 8, 16, 4)):
        h.load(slot, h.new_adapter(rank=rank))
    return h


def _previous_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonExperts as before the one-pass align: the expert sort alone, the wrapper aligns for LoRA."""
    monkeypatch.setattr(TritonExperts, "_route_and_lora_align", TwoGemmExperts._route_and_lora_align)


@pytest.mark.parametrize("M,slot_mode,disable", [(13, "mixed", None), (24, "one", None), (13, "mixed", 1)])
def test_one_pass_equals_previous_path(M, slot_mode, disable, device, monkeypatch):
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)  # LoRA sorts
    h = _harness(device)
    if disable is not None:
        h.reset(disable)  # a removed adapter: its slot still mapped, adapter_enabled 0
    x, logits = h.inputs(M, empty=False)  # every expert, the last one included, gets pairs
    slots = pick_slots(M, 3, slot_mode, seed=M)

    calls = _Calls(monkeypatch, use_triton=True)
    out = h.forward(x, logits, slots)
    assert (calls.one_pass, calls.wrapper) == (1, 0), "the layer must align once, the wrapper not at all"
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)

    with monkeypatch.context() as m:
        _previous_path(m)
        before = h.forward(x, logits, slots)
    assert (calls.one_pass, calls.wrapper) == (1, 1)
    assert torch.equal(out, before), "the same alignments must give the same output, bit for bit"


def test_one_pass_under_expert_parallelism(device, monkeypatch):
    """Two EP ranks (expert maps: other ranks' experts are -1): each aligns once, the ranks sum to the layer."""
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    monkeypatch.setattr(moe_lora_align, "one_pass_pays", lambda block, lora_block: True)  # a GPU's tiles may differ
    hs = [_harness(device, E=8, top_k=2, max_loras=2, seed=7, layer_kwargs=dict(ep_size=2, ep_rank=r))
          for r in range(2)]
    adapters = [hs[0].new_adapter(), hs[0].new_adapter(rank=8)]
    for h in hs:
        for s, ad in enumerate(adapters):
            h.load(s, ad)
    x, logits = hs[0].inputs(17, empty=False)
    slots = pick_slots(17, 2, "mixed", seed=3)
    calls = _Calls(monkeypatch, use_triton=True)
    outs = [h.forward(x, logits, slots) for h in hs]
    assert (calls.one_pass, calls.wrapper) == (2, 0)
    assert_close(sum(outs).cpu(), hs[0].reference(x, logits, slots), torch.float32)
    with monkeypatch.context() as m:
        _previous_path(m)
        for h, out in zip(hs, outs):
            assert torch.equal(out, h.forward(x, logits, slots))


@pytest.mark.parametrize("case", ["small_batch", "no_adapter", "pairwise_base", "other_block"])
def test_unchanged_where_it_does_not_apply(case, device, monkeypatch):
    small = case == "small_batch"
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)
    if case == "other_block":  # the base GEMMs on a larger block than the LoRA kernels: one pass is slower
        orig = fused_moe_gemm.get_two_gemm_configs

        def doubled(*args, **kwargs):
            return tuple(dataclasses.replace(c, block_size_m=2 * c.block_size_m) for c in orig(*args, **kwargs))

        monkeypatch.setattr(fused_moe_gemm, "get_two_gemm_configs", doubled)
    if case == "pairwise_base":  # 3 tokens x top-2 among 32 experts: one block per pair, no sort
        h = _harness(device, E=32, top_k=2, max_loras=2)
        M = 3
    else:
        h = _harness(device)
        M = 13
    x, logits = h.inputs(M, empty=False)
    slots = [-1] * M if case == "no_adapter" else pick_slots(M, len(h.slots), "mixed", seed=5)
    calls = _Calls(monkeypatch, use_triton=True)
    out = h.forward(x, logits, slots)
    expected_wrapper = {"small_batch": 0, "no_adapter": 0, "pairwise_base": 1, "other_block": 1}[case]
    assert (calls.one_pass, calls.wrapper) == (0, expected_wrapper)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)


def test_mismatched_alignment_is_refused(device):
    """An alignment made for another step (pairs) is a clear error, not a silent misread."""
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size

    h = _harness(device, E=8, top_k=2, max_loras=2)
    ctx = h.layer.base_layer.lora_context
    h.punica.update_metadata([0, 1, -1, 0])
    x = torch.randn(4, 32, device=device)
    ids = torch.randint(0, 8, (5, 2), dtype=torch.int32, device=device)  # 5 tokens, not 4
    al = moe_lora_align_block_size(ids, torch.zeros(5, dtype=torch.int32, device=device), num_experts=8,
                                   max_loras=2, block_size=16, adapter_enabled=ctx.adapter_enabled)
    y = torch.zeros(8, 64, device=device)
    with pytest.raises(ValueError, match="moe_lora_align_plan"):
        h.punica.add_lora_w13(y, x, ctx, topk_ids=ids[:4], topk_weights=torch.ones(4, 2, device=device),
                              alignment=al)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [16, 64, 256, 1024])
def test_one_pass_on_gpu(M, dtype, monkeypatch):
    """On the GPU with its own tile and path choices (none forced): the LoRA alignment is made once where the LoRA
    sorts - in one pass with the experts' where both blocks agree (``one_pass_pays``), else by the wrapper - and
    the output is the previous path's."""
    dev = torch.device("cuda")
    h = Harness(E=64, top_k=8, H=128, I=64, backend="triton", device=dev, dtype=dtype, max_loras=4, max_rank=16,
                seed=M)
    for slot in range(4):
        h.load(slot, h.new_adapter(rank=16 if slot % 2 else 8))
    x, logits = h.inputs(M, empty=False)
    slots = pick_slots(M, 4, "mixed", seed=M)
    pays: list[bool] = []
    real_pays = moe_lora_align.one_pass_pays
    monkeypatch.setattr(moe_lora_align, "one_pass_pays", lambda b, lb: pays.append(real_pays(b, lb)) or pays[-1])
    calls = _Calls(monkeypatch, use_triton=True)
    out = h.forward(x, logits, slots)
    sorts = h.punica.moe_lora_align_plan(x, h.layer.base_layer.lora_context) is not None
    one_pass = bool(pays) and pays[0]  # asked only where the LoRA sorts and the base does not take one block per pair
    assert (calls.one_pass, calls.wrapper) == ((1, 0) if one_pass else (0, 1) if sorts else (0, 0))
    if M >= 256:
        assert sorts, "2048+ pairs over 64 experts x 4 slots take the sorted LoRA path"
    assert_close(out.float().cpu(), h.reference(x, logits, slots), dtype)
    with monkeypatch.context() as m:
        _previous_path(m)
        assert torch.equal(out, h.forward(x, logits, slots))
