"""FusedMoE with quant_config=Mxfp4Config against the fp32 loop reference on dequantised weights.

The reference weights come from transformers' dequantiser; the layer keeps 4-bit codes.
Backends: torch (CPU path, one expert dequantised at a time) and the Triton
UnfusedOAITritonExperts (interpreter on CPU, native bf16 on the GPU).
"""
import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import router_inputs
from tests.layers.mxfp4_setup import dequantized_weights, make_mxfp4_layer, random_mxfp4_checkpoint
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.router import fused_topk

# (tokens, E, top_k, H, I, activation, bias, every): every expert gets tokens, or all but one drawn at random
CASES = [
    (1, 4, 2, 64, 32, "swigluoai", True, False),
    (7, 8, 2, 32, 64, "swigluoai", True, False),
    (13, 8, 4, 64, 64, "swigluoai", True, True),
    (9, 4, 2, 32, 32, "silu", False, True),
]


def _ref(w, x, logits, top_k, activation):
    tw, ti = fused_topk(logits.float().cpu(), top_k, renormalize=False, topk_then_softmax=True)
    return moe_reference(x.float().cpu(), w.w13, w.w2, tw, ti, activation, b13=w.b13, b2=w.b2).float()


def _case(M, E, top_k, H, I, activation, bias, every, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + M * 131 + E)
    ck = random_mxfp4_checkpoint(E, H, I, bias, gen, gated=activation in ("silu", "swigluoai"))
    x, logits = router_inputs(M, E, H, dtype, device, gen, top_k=top_k, empty=not every)
    return ck, x, logits


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16)])
@pytest.mark.parametrize("M,E,top_k,H,I,activation,bias,every", CASES)
def test_mxfp4_layer_matches_reference(backend, dtype, M, E, top_k, H, I, activation, bias, every, device):
    ck, x, logits = _case(M, E, top_k, H, I, activation, bias, every, dtype, device)
    layer = make_mxfp4_layer(ck, top_k, dtype, device, backend=backend, activation=activation)
    out = layer(x, logits)
    assert_close(out.float().cpu(), _ref(dequantized_weights(ck), x, logits, top_k, activation), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("M", [1, 16, 200])
def test_mxfp4_layer_bf16_on_gpu(backend, M):
    ck, x, logits = _case(M, 32, 4, 256, 128, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 4, torch.bfloat16, "cuda", backend=backend)
    assert_close(layer(x, logits).float().cpu(), _ref(dequantized_weights(ck), x, logits, 4, "swigluoai"),
                 torch.bfloat16)


def test_oracle_picks_triton_on_cuda_and_torch_on_cpu(device):
    ck, _, _ = _case(1, 4, 2, 32, 32, "swigluoai", True, True, torch.float32, device)
    layer = make_mxfp4_layer(ck, 2, torch.float32, device, backend=None)
    expected = "UnfusedOAITritonExperts" if device.type == "cuda" else "TorchMxfp4Experts"
    assert type(layer.quant_method.kernel.fused_experts).__name__ == expected
    assert layer.moe_backend == ("mxfp4-triton" if device.type == "cuda" else "mxfp4-torch")


def test_weights_stay_four_bit(device):
    """No float copy of the expert weights exists: 4.25 bits per value plus the biases."""
    E, H, I = 4, 64, 64
    ck, x, logits = _case(3, E, 2, H, I, "swigluoai", True, True, torch.bfloat16, device)
    layer = make_mxfp4_layer(ck, 2, torch.bfloat16, device, backend=None)
    layer(x, logits)
    tensors = dict(layer.named_parameters())
    tensors.update(layer.named_buffers())
    floats = {n for n, t in tensors.items() if t.is_floating_point()}
    assert floats == {"w13_bias", "w2_bias"}
    # bytes actually stored, each storage once: on CUDA the tensor-core copy (int32 words, transposed scales)
    # replaces the blocks and scales, which stay as shape-only views over one element
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors.values() if not t.is_floating_point()}
    code_bytes = sum(b for b in storages.values() if b > 1)
    assert code_bytes * 8 == E * 3 * H * I * 4.25
    assert layer.w13_weight.dtype == torch.uint8 and layer.w13_weight.data_ptr() == layer.w13_blocks.data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_expert_parallel_ranks_sum_to_full_layer(backend, device):
    """Each EP rank loads its experts from the full checkpoint tensors (the last rank holds the last
    expert); the ranks' outputs add up to the full layer."""
    ck, x, logits = _case(11, 8, 2, 32, 32, "swigluoai", True, True, torch.float32, device)
    ranks = [make_mxfp4_layer(ck, 2, torch.float32, device, backend=backend, ep_size=4, ep_rank=r)
             for r in range(4)]
    assert torch.equal(ranks[3].w13_blocks.cpu(), ck["gate_up_proj_blocks"][6:8])
    assert torch.equal(ranks[1].w2_scales.cpu(), ck["down_proj_scales"][2:4])
    total = sum(layer(x, logits) for layer in ranks)
    assert_close(total.cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_parallel_shards_sum_to_full_layer(backend, device):
    """TP slices w13 rows (gate/up pairs stay together) and w2's scale groups along I."""
    E, H, I = 4, 32, 64
    ck, x, logits = _case(6, E, 2, H, I, "swigluoai", True, True, torch.float32, device)
    parts = [make_mxfp4_layer(ck, 2, torch.float32, device, backend=backend, tp_size=2, tp_rank=r)
             for r in range(2)]
    assert torch.equal(parts[1].w13_scales.cpu(), ck["gate_up_proj_scales"][:, I:])
    assert torch.equal(parts[1].w2_blocks.cpu(), ck["down_proj_blocks"][:, :, 1:])
    assert torch.equal(parts[1].w13_bias.cpu(), ck["gate_up_proj_bias"][:, I:])
    # the ranks' partial sums are all-reduced, so w2's bias lives on TP rank 0 only
    assert torch.equal(parts[0].w2_bias.cpu(), ck["down_proj_bias"]) and not parts[1].w2_bias.any()
    total = sum(p(x, logits) for p in parts)
    assert_close(total.cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.float32)
