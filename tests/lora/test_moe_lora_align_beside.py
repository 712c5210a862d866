"""The sorted MoE LoRA path's (adapter, expert) alignment made beside GEMM1 (``lora_overlap.ALIGN_BESIDE``).

With the switch on, the in-place w13 seam's alignment is made by ``PunicaWrapper.moe_lora_alignment`` inside
``lora_overlap.beside`` (on CUDA: the side stream, while GEMM1 runs on the current one; on CPU: in order) and
handed to ``add_lora_w13``, which then does not align again; the one-pass align of ``TritonExperts`` is not used.
Checked: once per forward, inside ``beside``; the output bit for bit the switch-off layer's and close to the fp32
reference, on both experts backends; nothing changes where the LoRA does not sort (per-pair path, no adapter).
On a GPU the same tests run the side stream.
"""
from __future__ import annotations

import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.ops import moe_lora_align
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_overlap


class _Calls:
    """Counts the wrapper's aligns (and how many ran inside ``lora_overlap.beside``), the ``beside`` calls and the
    one-pass aligns of the forwards that follow."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.aligns = self.aligns_beside = self.beside = self.one_pass = 0
        self._inside = False
        wrapper_align, beside, combined = PunicaWrapperGPU._align, lora_overlap.beside, moe_lora_align.moe_align_with_lora

        def counted_align(wrapper, *args, **kwargs):
            self.aligns += 1
            self.aligns_beside += self._inside
            return wrapper_align(wrapper, *args, **kwargs)

        def counted_beside(device, side, main):
            self.beside += 1

            def side_marked():
                self._inside = True
                try:
                    return side()
                finally:
                    self._inside = False

            return beside(device, side_marked, main)

        def counted_combined(*args, **kwargs):
            self.one_pass += 1
            return combined(*args, **kwargs)

        monkeypatch.setattr(PunicaWrapperGPU, "_align", counted_align)
        monkeypatch.setattr(lora_overlap, "beside", counted_beside)
        monkeypatch.setattr(moe_lora_align, "moe_align_with_lora", counted_combined)


def _harness(device, *, E=16, top_k=4, max_loras=3, seed=5) -> Harness:
    h = Harness(E=E, top_k=top_k, H=32, I=32, backend="triton", device=device, max_loras=max_loras, max_rank=16,
                seed=seed)
    for slot, rank in zip(range(max_loras), (16, 8, 4)):
        h.load(slot, h.new_adapter(rank=rank))
    return h


def _sorted(monkeypatch: pytest.MonkeyPatch, small: bool = False) -> None:
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)


@pytest.mark.parametrize("M,slot_mode", [(13, "mixed"), (24, "one")])
def test_alignment_made_once_beside_gemm1(M, slot_mode, device, monkeypatch):
    _sorted(monkeypatch)
    h = _harness(device)
    x, logits = h.inputs(M, empty=False)  # every expert, the last one included, gets pairs
    slots = pick_slots(M, 3, slot_mode, seed=M)
    with monkeypatch.context() as m:
        m.setattr(lora_overlap, "ALIGN_BESIDE", False)
        off = h.forward(x, logits, slots)

    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    calls = _Calls(monkeypatch)
    on = h.forward(x, logits, slots)
    assert (calls.aligns, calls.aligns_beside, calls.beside, calls.one_pass) == (1, 1, 1, 0), \
        "one alignment, made inside beside(), and no one-pass align"
    assert torch.equal(on, off), "the same alignment must give the same output, bit for bit"
    assert_close(on.float().cpu(), h.reference(x, logits, slots), h.dtype)


def test_equal_blocks_skip_the_one_pass_align(device, monkeypatch):
    """Where the one-pass align would be used (the base GEMMs on the LoRA kernels' block), the switch makes the
    LoRA alignment beside GEMM1 instead; the result is the same bits."""
    _sorted(monkeypatch)
    h = _harness(device)
    x, logits = h.inputs(20, empty=False)
    slots = pick_slots(20, 3, "mixed", seed=1)
    with monkeypatch.context() as m:
        m.setattr(lora_overlap, "ALIGN_BESIDE", False)
        calls = _Calls(m)
        one_pass = h.forward(x, logits, slots)
        made_one_pass = calls.one_pass
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    calls = _Calls(monkeypatch)
    beside = h.forward(x, logits, slots)
    assert (calls.one_pass, calls.aligns_beside) == (0, 1)
    assert torch.equal(beside, one_pass)
    if made_one_pass == 0:
        pytest.skip("this shape's base block differs from the LoRA block: no one-pass align to skip")


@pytest.mark.parametrize("case", ["per_pair", "no_adapter"])
def test_nothing_beside_where_the_lora_does_not_sort(case, device, monkeypatch):
    _sorted(monkeypatch, small=case == "per_pair")
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    h = _harness(device)
    M = 13
    x, logits = h.inputs(M, empty=False)
    slots = [-1] * M if case == "no_adapter" else pick_slots(M, 3, "mixed", seed=2)
    calls = _Calls(monkeypatch)
    out = h.forward(x, logits, slots)
    assert calls.aligns == 0 and calls.aligns_beside == 0
    if case == "no_adapter":  # (the per-pair path forks for its delta buffers on a GPU)
        assert calls.beside == 0, "no fork of the side stream for an alignment that is not made"
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)
