"""FusedMoE + LoRA against the fp32 loop reference (transformers-independent).

Backends: torch experts + torch Punica wrapper, and Triton experts + Triton
Punica wrapper (interpreter on CPU, native on GPU).  The LoRA paths of the
Triton wrapper - sorted and small-batch - are forced in turn.
"""
import pytest
import torch

from tests.layers.moe_setup import pick_slots
from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

# (tokens, E, top_k, H, I, activation, bias, max_loras, max_rank, ranks, slot_mode, fused, every):
# every expert gets tokens, or all but one drawn at random
CASES = [
    (0, 4, 2, 32, 32, "silu", False, 2, 16, [16, 8], "mixed", False, False),
    (1, 4, 1, 32, 32, "silu", False, 1, 8, [8], "one", False, False),
    (7, 8, 2, 32, 48, "silu", False, 4, 16, [16, 8, 16, 4], "mixed", False, True),
    (33, 16, 8, 32, 32, "silu", False, 3, 32, [32, 16, 8], "mixed", False, False),
    (33, 8, 2, 32, 32, "gelu", False, 2, 16, [16, 16], "one", True, True),
    (7, 8, 2, 32, 32, "silu_no_mul", False, 2, 8, [8, 8], "mixed", False, False),
    (33, 8, 4, 32, 32, "swigluoai", True, 2, 16, [16, 8], "mixed", True, True),
    (33, 8, 2, 32, 32, "silu", False, 2, 64, [64, 16], "mixed", False, False),
    (33, 8, 2, 32, 32, "silu", False, 2, 16, [16, 16], "none", False, True),
    (300, 64, 8, 64, 64, "silu", False, 4, 16, [16, 8, 16, 16], "mixed", False, True),
]
BACKENDS = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32),
            ("triton", torch.float16), ("triton", torch.bfloat16)]


@pytest.fixture(params=["sorted", "small_batch"])
def lora_path(request, monkeypatch):
    small = request.param == "small_batch"
    monkeypatch.setattr(PunicaWrapperGPU, "_use_small_batch", lambda self, n, e, l, r: small)
    return request.param


def _check(h, M, slot_mode, seed=0, empty=True):
    x, logits = h.inputs(M, empty=empty)
    slots = pick_slots(M, len(h.slots), slot_mode, seed)
    out = h.forward(x, logits, slots)
    assert_close(out.float().cpu(), h.reference(x, logits, slots), h.dtype)
    return out


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias,max_loras,max_rank,ranks,slot_mode,fused,every", CASES)
def test_moe_lora_matches_reference(backend, dtype, M, E, top_k, H, I, activation, bias, max_loras, max_rank,
                                    ranks, slot_mode, fused, every, lora_path, device):
    if backend == "torch" and lora_path != "sorted":
        pytest.skip("the torch wrapper has one path")
    if device.type == "cpu" and backend == "triton":
        if dtype == torch.bfloat16:
            # The interpreter casts fp32 -> bf16 by truncation, not round-to-nearest
            # (measured: max relative error 2^-7 instead of 2^-8), so bf16 stores carry
            # twice the GPU's rounding error; bf16 is checked on the GPU.
            pytest.skip("bf16 Triton runs on the GPU")
        if M >= 300 or (dtype != torch.float32 and M > 7):
            pytest.skip("interpreter time: this case runs on the GPU")
    h = Harness(E=E, top_k=top_k, H=H, I=I, activation=activation, bias=bias, dtype=dtype, device=device,
                backend=backend, max_loras=max_loras, max_rank=max_rank, fused=fused, seed=M + E)
    for slot, r in enumerate(ranks):
        h.load(slot, h.new_adapter(rank=r))
    _check(h, M, slot_mode, empty=not every)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_removed_adapter_contributes_exactly_zero(backend, lora_path, device):
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=2, seed=3)
    h.load(0, h.new_adapter())
    h.load(1, h.new_adapter())
    x, logits = h.inputs(9)
    h.reset(1)
    on_removed = h.forward(x, logits, [1] * 9)
    base_only = h.forward(x, logits, [-1] * 9)
    assert torch.equal(on_removed, base_only)
    assert_close(on_removed.cpu(), h.reference(x, logits, [-1] * 9), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slot_reuse_after_reset(backend, lora_path, device):
    """A slot refilled with a lower-rank adapter holds exactly the new adapter."""
    h = Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=2, max_rank=16, seed=4)
    h.load(0, h.new_adapter(rank=16))
    h.load(1, h.new_adapter(rank=16))
    _check(h, 9, "mixed")
    h.reset(0)
    h.load(0, h.new_adapter(rank=4))
    _check(h, 9, "mixed", seed=1, empty=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_router_weight_on_input_with_lora(backend, lora_path, device):
    h = Harness(E=8, top_k=1, H=32, I=32, backend=backend, device=device, max_loras=2, seed=6,
                layer_kwargs=dict(apply_router_weight_on_input=True, renormalize=False))
    h.load(0, h.new_adapter())
    h.load(1, h.new_adapter(rank=8))
    _check(h, 11, "mixed")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_map_with_lora(backend, lora_path, device):
    """EP ranks with LoRA: each adds deltas for its own experts only; the ranks sum to the full layer."""
    hs = [Harness(E=8, top_k=2, H=32, I=32, backend=backend, device=device, max_loras=2, seed=7,
                  layer_kwargs=dict(ep_size=2, ep_rank=r)) for r in range(2)]
    adapters = [hs[0].new_adapter(), hs[0].new_adapter(rank=8)]
    for h in hs:
        for s, ad in enumerate(adapters):
            h.load(s, ad)
    x, logits = hs[0].inputs(13, empty=False)
    slots = pick_slots(13, 2, "mixed")
    total = sum(h.forward(x, logits, slots) for h in hs)
    assert_close(total.cpu(), hs[0].reference(x, logits, slots), torch.float32)


def test_per_expert_and_fused_layouts_agree(device):
    """The same adapter through the two-slice and the one-slice (3D) layer gives the same output."""
    h2 = Harness(E=8, top_k=2, H=32, I=32, backend="torch", device=device, max_loras=1, max_rank=16, seed=8)
    h3 = Harness(E=8, top_k=2, H=32, I=32, backend="torch", device=device, max_loras=1, max_rank=16, seed=8,
                 fused=True)
    ad = h2.new_adapter(rank=8)  # two slices of rank 8 -> one slice of rank 16 in the 3D layer
    h2.load(0, ad)
    h3.load(0, ad)
    x, logits = h2.inputs(10)
    out2, out3 = h2.forward(x, logits, [0] * 10), h3.forward(x, logits, [0] * 10)
    assert_close(out3.cpu(), out2.cpu(), torch.float32)
    assert_close(out2.cpu(), h2.reference(x, logits, [0] * 10), torch.float32)
