"""The sorted MoE LoRA seams in two halves, each shrink beside its GEMM (``lora_overlap.SHRINK_BESIDE``).

With the switch on (and ``ALIGN_BESIDE``), the w13 seam's alignment and shrink run inside ``lora_overlap.beside``
(on CUDA: the side stream, while GEMM1 runs; on CPU: in order), the w2 seam's shrink beside GEMM2, and only the
expands after the GEMMs (``punica_wrapper/moe_split_seams.py``).  Checked: two shrinks a forward, both inside
``beside``, and no fused seam; the output bit for bit the switch-off layer's (the halves are the fused kernel's)
and close to the fp32 reference, with per-slice A and with one A shared by gate and up (the second copy
poisoned); nothing splits where the LoRA does not sort.  On a GPU the same tests run the side stream.
"""
from __future__ import annotations

import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_overlap


class _Calls:
    """Counts the wrapper's shrinks (and those inside ``lora_overlap.beside``), expands and fused seams."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shrinks = self.shrinks_beside = self.expands = self.fused = 0
        self.a_slices: list[int] = []  # A slices each shrink reads
        self._inside = False
        shrink, expand, fused, beside = (PunicaWrapperGPU._shrink, PunicaWrapperGPU._expand, PunicaWrapperGPU._fused,
                                         lora_overlap.beside)

        def counted_shrink(wrapper, *args, **kwargs):
            self.shrinks += 1
            self.shrinks_beside += self._inside
            self.a_slices.append(len(args[1]))
            return shrink(wrapper, *args, **kwargs)

        def counted_expand(wrapper, *args, **kwargs):
            self.expands += 1
            assert not self._inside, "an expand must run after its GEMM, on the current stream"
            return expand(wrapper, *args, **kwargs)

        def counted_fused(wrapper, *args, **kwargs):
            self.fused += 1
            return fused(wrapper, *args, **kwargs)

        def counted_beside(device, side, main):
            def side_marked():
                self._inside = True
                try:
                    return side()
                finally:
                    self._inside = False

            return beside(device, side_marked, main)

        monkeypatch.setattr(PunicaWrapperGPU, "_shrink", counted_shrink)
        monkeypatch.setattr(PunicaWrapperGPU, "_expand", counted_expand)
        monkeypatch.setattr(PunicaWrapperGPU, "_fused", counted_fused)
        monkeypatch.setattr(lora_overlap, "beside", counted_beside)


def _sorted(monkeypatch: pytest.MonkeyPatch, small: bool = False) -> None:
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)


def _harness(device, *, fused_adapters: bool, seed: int = 5) -> Harness:
    h = Harness(E=16, top_k=4, H=32, I=32, backend="triton", device=device, max_loras=3, max_rank=16, seed=seed)
    for slot, rank in zip(range(3), (16, 8, 4)):
        h.load(slot, h.new_adapter(rank=rank, fused=fused_adapters))
    return h


@pytest.mark.parametrize("fused_adapters", [False, True], ids=["per-slice-a", "shared-a"])
@pytest.mark.parametrize("M,slot_mode", [(13, "mixed"), (24, "one")])
def test_shrinks_beside_the_gemms_same_bits(M, slot_mode, fused_adapters, device, monkeypatch):
    _sorted(monkeypatch)
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    h = _harness(device, fused_adapters=fused_adapters)
    x, logits = h.inputs(M, empty=False)  # every expert, the last one included, gets pairs
    slots = pick_slots(M, 3, slot_mode, seed=M)
    with monkeypatch.context() as m:
        m.setattr(lora_overlap, "SHRINK_BESIDE", False)
        off = h.forward(x, logits, slots)

    monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", True)
    layer = h.layer
    if fused_adapters:
        assert layer.w13_a_shared
        layer._w13_a[1].fill_(float("nan"))  # the second copy of A: never read while the slices share one
    calls = _Calls(monkeypatch)
    on = h.forward(x, logits, slots)
    assert (calls.shrinks, calls.shrinks_beside, calls.expands, calls.fused) == (2, 2, 2, 0), \
        "w13 and w2: each shrink inside beside(), each expand after it, no fused seam"
    assert calls.a_slices == [1 if fused_adapters else 2, 1], "slices that share A are shrunk once"
    assert torch.equal(on, off), "the halves are the fused kernel's: the same bits"
    assert_close(on.float().cpu(), h.reference(x, logits, slots), h.dtype)


def test_off_without_align_beside(device, monkeypatch):
    """The switch needs the alignment beside GEMM1: without it the fused seams run."""
    _sorted(monkeypatch)
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", False)
    monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", True)
    h = _harness(device, fused_adapters=False)
    x, logits = h.inputs(13, empty=False)
    slots = pick_slots(13, 3, "mixed", seed=3)
    calls = _Calls(monkeypatch)
    out = h.forward(x, logits, slots)
    assert (calls.shrinks, calls.fused) == (0, 2)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)


@pytest.mark.parametrize("case", ["per_pair", "no_adapter"])
def test_no_halves_where_the_lora_does_not_sort(case, device, monkeypatch):
    _sorted(monkeypatch, small=case == "per_pair")
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", True)
    h = _harness(device, fused_adapters=False)
    M = 13
    x, logits = h.inputs(M, empty=False)
    slots = [-1] * M if case == "no_adapter" else pick_slots(M, 3, "mixed", seed=2)
    calls = _Calls(monkeypatch)
    out = h.forward(x, logits, slots)
    assert calls.shrinks == 0 and calls.expands == 0
    assert calls.fused == (2 if case == "per_pair" else 0)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [64, 256])
def test_halves_in_a_cuda_graph(M, monkeypatch):
    """Qwen3-30B-A3B's widths (64 of its experts), bf16, the sorted path: captured with both streams and replayed
    with new inputs in the same buffers, close to the fp32 reference and to the fused seams eagerly (the halves'
    kernels are compiled apart from the fused one, so a GPU may order a dot's sums differently: within one bf16
    unit; the CPU tests above hold them to the same bits)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _sorted(monkeypatch)
    monkeypatch.setattr(lora_overlap, "ALIGN_BESIDE", True)
    monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", True)
    h = Harness(E=64, top_k=8, H=2048, I=768, dtype=torch.bfloat16, device=torch.device("cuda"), backend="triton",
                max_loras=4, max_rank=16, seed=21)
    for s in range(4):
        h.load(s, h.new_adapter(rank=16 if s % 2 else 8, fused=True))  # peft's gate_up: one A for both slices
    x, logits = h.inputs(M, empty=False)
    slots = pick_slots(M, 4, "mixed", seed=M)
    h.punica.update_metadata(slots)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            h.layer(x, logits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = h.layer(x, logits)
    for _ in range(2):
        x2, logits2 = h.inputs(M, empty=False)
        x.copy_(x2)
        logits.copy_(logits2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", False)
        fused = h.forward(x, logits, slots)
        monkeypatch.setattr(lora_overlap, "SHRINK_BESIDE", True)
        assert_close(out.float().cpu(), fused.float().cpu(), torch.bfloat16, name="halves vs fused seams")
        assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.bfloat16)
