"""The Triton experts with the activation in GEMM1's epilogue (``fused_moe_gemm.FUSED_ACTIVATION``): the layer
against the fp32 loop reference and against the unfused layer; taken on steps without LoRA only (with LoRA the
w13 delta joins before the activation, so the unfused pipeline runs)."""
import pytest
import torch

from tests.layers.moe_setup import make_layer, pick_slots, random_weights, router_inputs
from tests.layers.test_fused_moe_layer import _ref
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.ops import fused_moe_gemm as gemm


@pytest.fixture
def fused_launches(monkeypatch):
    """FUSED_ACTIVATION on; counts GEMM launches with the activation in their epilogue."""
    calls = []
    real = gemm.invoke_fused_moe_gemm

    def spy(*args, **kw):
        calls.append(kw.get("fused_activation"))
        return real(*args, **kw)

    monkeypatch.setattr(gemm, "FUSED_ACTIVATION", True)
    monkeypatch.setattr(gemm, "invoke_fused_moe_gemm", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias", [
    (1, 8, 2, 32, 32, "silu", False),  # a decode step: pairwise blocks
    (7, 8, 2, 48, 40, "gelu", False),
    (33, 8, 4, 64, 32, "swigluoai", True),  # gpt-oss: interleaved gate / up, biases
    (33, 16, 8, 32, 48, "silu", False),
])
def test_layer_matches_reference_and_unfused(M, E, top_k, H, I, activation, bias, dtype, fused_launches, monkeypatch,
                                             device):
    gen = torch.Generator().manual_seed(M * 17 + E)
    w = random_weights(E, H, I, activation, bias, gen)
    layer = make_layer(w, top_k, activation, dtype, device, backend="triton")
    x, logits = router_inputs(M, E, H, dtype, device, gen, top_k=top_k, empty=False)
    fused = layer(x, logits)
    assert [a.value for a in fused_launches if a is not None] == [activation]
    assert_close(fused.float().cpu(), _ref(w, x, logits, top_k, activation).float(), dtype)
    monkeypatch.setattr(gemm, "FUSED_ACTIVATION", False)
    unfused = layer(x, logits)
    if device.type == "cuda":
        assert torch.equal(fused, unfused)
    else:  # the interpreter's dots may sum tiles of different widths in different orders
        assert_close(fused.float(), unfused.float(), dtype)


@pytest.mark.parametrize("slot_mode,expect_fused", [("mixed", False), ("none", True)])
def test_with_lora_only_adapter_free_steps_fuse(slot_mode, expect_fused, fused_launches, device):
    """LoRA running: the unfused pipeline (a fused launch would drop the w13 delta: the reference would
    differ); no token with an adapter: the fused launch, still the reference's output."""
    h = Harness(E=8, top_k=2, H=32, I=32, activation="silu", dtype=torch.float32, device=device, backend="triton",
                max_loras=2, max_rank=16, seed=3)
    for slot in range(2):
        h.load(slot, h.new_adapter(rank=16))
    x, logits = h.inputs(7)
    slots = pick_slots(7, 2, slot_mode, 0)
    out = h.forward(x, logits, slots)
    assert any(a is not None for a in fused_launches) == expect_fused
    assert_close(out.float().cpu(), h.reference(x, logits, slots), torch.float32)
