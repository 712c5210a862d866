"""A MoE layer's scratch buffers outlive the autograd mode they were first made in.

The engine runs under torch.inference_mode (CUDA-graph capture too, which is where the buffers are
first allocated on a GPU); a later forward under torch.no_grad (tests, tools) must still be able to
write them. Tensors made under inference_mode refuse in-place writes outside it.
"""
import pytest
import torch

from tests.layers.moe_reference import moe_reference
from tests.layers.moe_setup import make_layer, random_weights, router_inputs
from tests.utils import assert_close
from vllm.model_executor.layers.fused_moe.router import fused_topk


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("first,then", [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)])
def test_forward_under_another_mode_after_the_first(backend, first, then, device):
    gen = torch.Generator().manual_seed(3)
    E, H, I, top_k = 4, 32, 16, 2
    w = random_weights(E, H, I, "silu", False, gen)
    layer = make_layer(w, top_k, "silu", torch.float32, device, backend=backend)
    x, logits = router_inputs(8, E, H, torch.float32, device, gen)
    with first():
        layer(x, logits)
    x2, logits2 = router_inputs(6, E, H, torch.float32, device, gen)  # fewer tokens: the same buffers
    with then():
        out = layer(x2, logits2)
    weights, ids = fused_topk(logits2.float().cpu(), top_k, renormalize=True)  # the layer's default
    ref = moe_reference(x2.float().cpu(), w.w13, w.w2, weights.cpu(), ids.cpu(), "silu")
    assert_close(out.float().cpu(), ref, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_experts_write_the_layer_output_without_a_copy(backend, monkeypatch, device):
    """Without expert parallelism the finalize would only copy the experts' [M, H] output: they write the
    returned tensor itself (no scratch "fused_out", no device copy per layer), and it is the reference's."""
    from vllm.model_executor.layers.fused_moe import modular_kernel

    seen = []
    real = modular_kernel.TopKWeightAndReduceNoOP.apply

    def spy(self, output, fused_expert_output, *a, **k):
        seen.append(output.data_ptr() == fused_expert_output.data_ptr())
        return real(self, output, fused_expert_output, *a, **k)

    monkeypatch.setattr(modular_kernel.TopKWeightAndReduceNoOP, "apply", spy)
    gen = torch.Generator().manual_seed(4)
    E, H, I, top_k = 4, 32, 16, 2
    w = random_weights(E, H, I, "silu", False, gen)
    layer = make_layer(w, top_k, "silu", torch.float32, device, backend=backend)
    x, logits = router_inputs(5, E, H, torch.float32, device, gen)
    out = layer(x, logits)
    assert seen == [True]
    weights, ids = fused_topk(logits.float().cpu(), top_k, renormalize=True)
    assert_close(out.float().cpu(), moe_reference(x.float().cpu(), w.w13, w.w2, weights, ids, "silu"), torch.float32)
