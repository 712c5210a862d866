"""FusedMoE without LoRA against the fp32 loop reference, per backend."""
import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import make_layer, random_weights, router_inputs
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.router import fused_topk

# (tokens, E, top_k, H, I, activation, bias, every): every expert gets tokens, or all but one drawn at random
CASES = [
    (0, 4, 2, 32, 32, "silu", False, False),
    (1, 4, 1, 32, 32, "silu", False, False),
    (7, 8, 2, 48, 40, "gelu", False, True),
    (33, 16, 8, 32, 32, "silu", False, False),
    (33, 8, 2, 32, 48, "silu_no_mul", False, True),
    (7, 8, 2, 32, 32, "relu2_no_mul", True, False),
    (33, 8, 4, 64, 32, "swigluoai", True, True),
    (300, 64, 8, 32, 32, "silu", False, False),
]


def _run(layer, x, logits):
    return layer(x, logits)


def _ref(w, x, logits, top_k, activation, *, topk_then_softmax=False, on_input=False, renormalize=True):
    tw, ti = fused_topk(logits.float().cpu(), top_k, renormalize=renormalize, topk_then_softmax=topk_then_softmax)
    return moe_reference(x.float().cpu(), w.w13, w.w2, tw, ti, activation, b13=w.b13, b2=w.b2,
                         apply_router_weight_on_input=on_input)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16),
                                           ("triton", torch.bfloat16),
                                           ("naive_dense", torch.float32)])
@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias,every", CASES)
def test_fused_moe_matches_reference(backend, dtype, M, E, top_k, H, I, activation, bias, every, device):
    if backend == "triton" and device.type == "cpu" and (M >= 300 or dtype == torch.bfloat16):
        # bf16: the interpreter casts fp32 -> bf16 by truncation (see tests/lora); GPU only
        pytest.skip("interpreter: this case runs on the GPU only")
    gen = torch.Generator().manual_seed(M * 131 + E)
    w = random_weights(E, H, I, activation, bias, gen)
    layer = make_layer(w, top_k, activation, dtype, device, backend=backend)
    x, logits = router_inputs(M, E, H, dtype, device, gen, top_k=top_k, empty=not every)
    out = _run(layer, x, logits)
    assert_close(out.float().cpu(), _ref(w, x, logits, top_k, activation).float(), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_router_weight_on_input(backend, device):
    gen = torch.Generator().manual_seed(5)
    w = random_weights(8, 32, 32, "silu", False, gen)
    layer = make_layer(w, 1, "silu", torch.float32, device, backend=backend, apply_router_weight_on_input=True,
                       renormalize=False)
    x, logits = router_inputs(9, 8, 32, torch.float32, device, gen, top_k=1)
    ref = _ref(w, x, logits, 1, "silu", on_input=True, renormalize=False)
    assert_close(layer(x, logits).cpu(), ref.float(), torch.float32)
    # differs from weighting the output, so the test can tell the two apart
    assert not torch.allclose(ref, _ref(w, x, logits, 1, "silu", renormalize=False), rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_parallel_ranks_sum_to_full_layer(backend, device):
    """With an expert_map, each EP rank computes its own experts; the ranks' outputs add up."""
    gen = torch.Generator().manual_seed(11)
    w = random_weights(8, 32, 32, "silu", False, gen)
    x, logits = router_inputs(13, 8, 32, torch.float32, device, gen, top_k=2)
    total = sum(make_layer(w, 2, "silu", torch.float32, device, backend=backend, ep_size=2, ep_rank=r)(x, logits)
                for r in range(2))
    assert_close(total.cpu(), _ref(w, x, logits, 2, "silu").float(), torch.float32)


def test_tensor_parallel_shards_sum_to_full_layer(device):
    gen = torch.Generator().manual_seed(12)
    w = random_weights(4, 32, 64, "silu", True, gen)
    x, logits = router_inputs(5, 4, 32, torch.float32, device, gen, top_k=2)
    parts = [make_layer(w, 2, "silu", torch.float32, device, backend="torch", tp_size=2, tp_rank=r)
             for r in range(2)]
    # w2 bias is replicated on every TP rank: count it once, as an all-reduce of a row-parallel layer would.
    parts[1].w2_bias.data.zero_()
    total = sum(p(x, logits) for p in parts)
    assert_close(total.cpu(), _ref(w, x, logits, 2, "silu").float(), torch.float32)


def test_gpt_oss_routing_topk_then_softmax(device):
    gen = torch.Generator().manual_seed(13)
    w = random_weights(8, 32, 32, "swigluoai", True, gen)
    layer = make_layer(w, 4, "swigluoai", torch.float32, device, backend="torch", topk_then_softmax=True,
                       renormalize=False)
    x, logits = router_inputs(6, 8, 32, torch.float32, device, gen, top_k=4)
    ref = _ref(w, x, logits, 4, "swigluoai", topk_then_softmax=True)
    assert_close(layer(x, logits).cpu(), ref.float(), torch.float32)
