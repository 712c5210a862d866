"""The MoE LoRA expands in the GEMMs' epilogues (``lora_mixin.GEMM1_LORA_EPILOGUE`` / ``GEMM2_LORA_EPILOGUE``,
``ops/gemm_lora_epilogue.py``): whole LoRA-wrapped MoE layers on ``TritonExperts`` with the sorted LoRA path,
the switches on against off and against the fp32 loop reference; with a switch on its seam (``add_lora_w13`` /
``add_lora_w2``) launches nothing and the GEMM takes the epilogue (w13: with one slice only - adapters on fused
experts); tokens without an adapter keep the bits of the switches off.  Where it does not apply (the per-pair
path, the torch experts) nothing changes."""
import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness, captured_qwen3_layer, replay_with_new_inputs
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.model_executor.layers.fused_moe.experts import lora_mixin
from vllm.model_executor.layers.fused_moe.experts.triton_experts import TritonExperts


def _harness(backend, dtype, device, activation="silu", seed=5, fused=False):
    h = Harness(E=8, top_k=2, H=32, I=48, activation=activation, bias=activation == "swigluoai", dtype=dtype,
                device=device, backend=backend, max_loras=3, max_rank=16, seed=seed, fused=fused)
    h.load(0, h.new_adapter(rank=16))
    h.load(2, h.new_adapter(rank=8))
    return h


def _spy(monkeypatch):
    """Counts of the seams' launches and of the GEMMs run with an epilogue."""
    calls = {"add_lora_w13": 0, "add_lora_w2": 0, "epilogue 1": 0, "epilogue 2": 0}
    w13, w2, epi = PunicaWrapperBase.add_lora_w13, PunicaWrapperBase.add_lora_w2, TritonExperts._gemm_lora_epilogue

    def add_lora_w13(self, *a, **k):
        calls["add_lora_w13"] += 1
        return w13(self, *a, **k)

    def add_lora_w2(self, *a, **k):
        calls["add_lora_w2"] += 1
        return w2(self, *a, **k)

    def gemm_lora_epilogue(self, *a, stage, **k):
        ran = epi(self, *a, stage=stage, **k)
        calls[f"epilogue {stage}"] += ran
        return ran

    monkeypatch.setattr(PunicaWrapperBase, "add_lora_w13", add_lora_w13)
    monkeypatch.setattr(PunicaWrapperBase, "add_lora_w2", add_lora_w2)
    monkeypatch.setattr(TritonExperts, "_gemm_lora_epilogue", gemm_lora_epilogue)
    return calls


def _switches(monkeypatch, w13, w2):
    monkeypatch.setattr(lora_mixin, "GEMM1_LORA_EPILOGUE", w13)
    monkeypatch.setattr(lora_mixin, "GEMM2_LORA_EPILOGUE", w2)


def _dtypes(device):
    # the interpreter rounds fp32 -> bf16 by truncation: bf16 is compared on the GPU
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


@pytest.mark.parametrize("switches", [(False, True), (True, False), (True, True)], ids=["w2", "w13", "both"])
@pytest.mark.parametrize("activation,fused_w13", [("silu", True), ("silu", False), ("swigluoai", True)])
def test_epilogue_matches_the_seam_and_the_reference(activation, fused_w13, switches, device, monkeypatch):
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)  # the sorted path
    w13_on, w2_on = switches[0] and fused_w13, switches[1]  # two w13 slices (gate, up) keep the seam
    for dtype in _dtypes(device):
        h = _harness("triton", dtype, device, activation, fused=fused_w13)
        for M in (9, 33):
            x, logits = h.inputs(M, empty=M < 20)
            slots = pick_slots(M, 3, "mixed", seed=M)  # slot 1 is empty, -1 has none: base only
            calls = _spy(monkeypatch)
            _switches(monkeypatch, False, False)
            seam = h.forward(x, logits, slots)
            assert calls == {"add_lora_w13": 1, "add_lora_w2": 1, "epilogue 1": 0, "epilogue 2": 0}
            _switches(monkeypatch, *switches)
            fused = h.forward(x, logits, slots)
            assert calls == {"add_lora_w13": 2 - w13_on, "add_lora_w2": 2 - w2_on, "epilogue 1": int(w13_on),
                             "epilogue 2": int(w2_on)}, "an epilogue must replace its seam"
            base_only = torch.tensor([s not in h.slots for s in slots], device=fused.device)
            assert base_only.any() and not base_only.all()
            assert torch.equal(fused[base_only], seam[base_only]), (activation, dtype, M)
            assert_close(fused.float(), seam.float(), dtype)
            assert_close(fused.float().cpu(), h.reference(x, logits, slots), dtype)


def test_nothing_changes_where_it_does_not_apply(device, monkeypatch):
    """The per-pair LoRA path and the torch experts keep their w2 seam with the switch on."""
    _switches(monkeypatch, True, True)
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: True)
    for backend in ("triton", "torch"):
        h = _harness(backend, torch.float32, device, fused=True)
        x, logits = h.inputs(7)
        slots = pick_slots(7, 3, "mixed", seed=3)
        calls = _spy(monkeypatch)
        out = h.forward(x, logits, slots)
        assert calls == {"add_lora_w13": 1, "add_lora_w2": 1, "epilogue 1": 0, "epilogue 2": 0}, backend
        assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.float32)


def test_epilogue_under_expert_parallelism(device, monkeypatch):
    """Two expert-parallel ranks (each its half of the experts, an expert map): with the epilogues, rows of the other
    rank's experts get no delta, and the ranks still sum to the layer."""
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    _switches(monkeypatch, True, True)
    hs = [Harness(E=8, top_k=2, H=32, I=48, dtype=torch.float32, device=device, backend="triton", max_loras=3,
                  max_rank=16, seed=9, fused=True, layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    hs[0].load(0, hs[0].new_adapter(rank=16))
    hs[0].load(2, hs[0].new_adapter(rank=8))
    for s, ad in hs[0].slots.items():
        hs[1].load(s, ad)
    x, logits = hs[0].inputs(11, empty=False)
    slots = pick_slots(11, 3, "mixed", seed=4)
    outs = []
    for h in hs:
        calls = _spy(monkeypatch)
        outs.append(h.forward(x, logits, slots))
        assert calls == {"add_lora_w13": 0, "add_lora_w2": 0, "epilogue 1": 1, "epilogue 2": 1}
    assert_close(sum(outs).float().cpu(), hs[0].reference(x, logits, slots), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [64, 256])
def test_epilogue_at_qwen3_width_in_a_cuda_graph(M, monkeypatch):
    """Qwen3-30B-A3B's widths (64 of its experts), 4 adapters on the fused experts, bf16, the sorted path: captured
    with both switches on and replayed with new inputs; against the switches off and the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: False)
    _switches(monkeypatch, True, True)
    h, x, logits, slots, graph, out = captured_qwen3_layer(M, seed=7, fused=True)
    replay_with_new_inputs(h, x, logits, M, graph)
    _switches(monkeypatch, False, False)
    seam = h.forward(x, logits, slots)
    assert_close(out.float(), seam.float(), torch.bfloat16)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.bfloat16)
