"""The w2 LoRA expand in GEMM2's epilogue (``lora_mixin.GEMM2_LORA_EPILOGUE``, ``ops/gemm_lora_epilogue.py``):
whole LoRA-wrapped MoE layers on ``TritonExperts`` with the sorted LoRA path, the switch on against off and
against the fp32 loop reference; with it on the w2 seam (``add_lora_w2``) launches nothing and GEMM2 takes the
epilogue; tokens without an adapter keep the bits of the switch off.  Where it does not apply (the per-pair
path, the torch experts) nothing changes."""
import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_mixin
from vllm.model_executor.layers.fused_moe.experts.triton_experts import TritonExperts


def _harness(backend, dtype, device, activation="silu", seed=5):
    h = Harness(E=8, top_k=2, H=32, I=48, activation=activation, bias=activation == "swigluoai", dtype=dtype,
                device=device, backend=backend, max_loras=3, max_rank=16, seed=seed)
    h.load(0, h.new_adapter(rank=16))
    h.load(2, h.new_adapter(rank=8))
    return h


def _spy(monkeypatch):
    """Counts of the w2 seam's launches and of GEMM2 runs with the epilogue."""
    calls = {"add_lora_w2": 0, "epilogue": 0}
    seam, epi = PunicaWrapperBase.add_lora_w2, TritonExperts._gemm2_lora_epilogue

    def add_lora_w2(self, *a, **k):
        calls["add_lora_w2"] += 1
        return seam(self, *a, **k)

    def gemm2_lora_epilogue(self, *a, **k):
        ran = epi(self, *a, **k)
        calls["epilogue"] += ran
        return ran

    monkeypatch.setattr(PunicaWrapperBase, "add_lora_w2", add_lora_w2)
    monkeypatch.setattr(TritonExperts, "_gemm2_lora_epilogue", gemm2_lora_epilogue)
    return calls


def _dtypes(device):
    # the interpreter rounds fp32 -> bf16 by truncation: bf16 is compared on the GPU
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_epilogue_matches_the_seam_and_the_reference(activation, device, monkeypatch):
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)  # the sorted path
    for dtype in _dtypes(device):
        h = _harness("triton", dtype, device, activation)
        for M in (9, 33):
            x, logits = h.inputs(M, empty=M < 20)
            slots = pick_slots(M, 3, "mixed", seed=M)  # slot 1 is empty, -1 has none: base only
            calls = _spy(monkeypatch)
            monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", False)
            seam = h.forward(x, logits, slots)
            assert calls == {"add_lora_w2": 1, "epilogue": 0}
            monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", True)
            fused = h.forward(x, logits, slots)
            assert calls == {"add_lora_w2": 1, "epilogue": 1}, "the epilogue must replace the w2 seam"
            base_only = torch.tensor([s not in h.slots for s in slots], device=fused.device)
            assert base_only.any() and not base_only.all()
            assert torch.equal(fused[base_only], seam[base_only]), (activation, dtype, M)
            assert_close(fused.float(), seam.float(), dtype)
            assert_close(fused.float().cpu(), h.reference(x, logits, slots), dtype)


def test_nothing_changes_where_it_does_not_apply(device, monkeypatch):
    """The per-pair LoRA path and the torch experts keep their w2 seam with the switch on."""
    monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", True)
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    for backend in ("triton", "torch"):
        h = _harness(backend, torch.float32, device)
        x, logits = h.inputs(7)
        slots = pick_slots(7, 3, "mixed", seed=3)
        calls = _spy(monkeypatch)
        out = h.forward(x, logits, slots)
        assert calls == {"add_lora_w2": 1, "epilogue": 0}, backend
        assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [64, 256])
def test_epilogue_at_qwen3_width_in_a_cuda_graph(M, monkeypatch):
    """Qwen3-30B-A3B's widths (64 of its experts), 4 adapters, bf16, the sorted path: captured with the switch
    on and replayed with new inputs; against the switch off and the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", True)
    h = Harness(E=64, top_k=8, H=2048, I=768, dtype=torch.bfloat16, device=torch.device("cuda"), backend="triton",
                max_loras=4, max_rank=16, seed=7)
    for s in range(4):
        h.load(s, h.new_adapter(rank=16 if s % 2 else 8))
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
    x2, logits2 = h.inputs(M, empty=False)
    x.copy_(x2)
    logits.copy_(logits2)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", False)
    seam = h.forward(x, logits, slots)
    assert_close(out.float(), seam.float(), torch.bfloat16)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.bfloat16)
