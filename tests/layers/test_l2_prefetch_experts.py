"""What the MoE layers give the L2 prefetch (``ops/l2_prefetch.py``): each backend's ``stream_weights`` (bf16
weights, the int4 packed words, the MXFP4 blocks or tensor-core words - one block per expert), the router's
top-k target, and on a GPU the layer's output with the prefetch on bit for bit the one without."""
import pytest
import torch

from tests.layers.moe_setup import make_layer, random_weights, router_inputs
from tests.layers.mxfp4_setup import make_mxfp4_layer, random_mxfp4_checkpoint
from tests.quantization.int4_moe_setup import make_int4_layer, random_int4_experts
from vllm.model_executor.layers.ops import l2_prefetch


def _layers(device, dtype):
    gen = torch.Generator().manual_seed(0)
    E, H, I = 8, 64, 32
    bf16 = make_layer(random_weights(E, H, I, "silu", False, gen), 2, "silu", dtype, device, backend="triton")
    int4 = make_int4_layer(random_int4_experts(E, H, I, "silu", 32, "sym", gen), 2, "silu", 32, "sym", dtype,
                           device, backend="marlin")
    mx = make_mxfp4_layer(random_mxfp4_checkpoint(E, H, I, True, gen), 2, dtype, device, backend="triton")
    return {"bf16": bf16, "int4": int4, "mxfp4": mx}


def test_each_backend_names_what_its_gemms_stream(device, monkeypatch):
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH", True)
    for name, layer in _layers(device, torch.float32).items():
        w13, w2 = layer.experts.stream_weights(getattr(layer, "w13_weight", None), getattr(layer, "w2_weight", None))
        assert w13 is not None and w2 is not None, name
        assert w13.shape[0] == 8 and w2.shape[0] == 8 and w13.is_contiguous() and w2.is_contiguous(), name
        if name == "bf16":
            assert w13 is layer.w13_weight and w2 is layer.w2_weight
        else:  # packed: 4 bits a weight (plus nothing: the scales stay out)
            assert w13.numel() * w13.element_size() * 2 == 8 * 64 * 64, name
        assert layer.runner._prefetch_target() is w13, name
        assert l2_prefetch.plan_experts(w13, 1, 2) is not None, name


def test_no_target_with_expert_parallelism(device, monkeypatch):
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH", True)
    gen = torch.Generator().manual_seed(1)
    layer = make_layer(random_weights(8, 64, 32, "silu", False, gen), 2, "silu", torch.float32, device,
                       backend="triton", ep_size=2, ep_rank=1)
    assert layer.runner._prefetch_target() is None  # the top-k's ids are global, the weights local


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 3])
def test_layers_give_the_same_bits_with_the_prefetch(M, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    dev = torch.device("cuda")
    for name, layer in _layers(dev, torch.bfloat16).items():
        gen = torch.Generator().manual_seed(M)
        x, logits = router_inputs(M, 8, 64, torch.bfloat16, dev, gen, top_k=2)
        outs = []
        for on in (False, True):
            monkeypatch.setattr(l2_prefetch, "L2_PREFETCH", on)
            outs.append(layer(x, logits))
        assert torch.equal(outs[0], outs[1]), name
