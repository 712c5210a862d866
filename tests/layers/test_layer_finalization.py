"""FusedMoE is finalised explicitly (``process_weights_after_loading``): forward and LoRA wrapping
refuse a layer without it and build nothing themselves; the slicing LoRA reuses is public."""
import pytest
import torch

from tests.layers.moe_setup import random_weights
from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA
from vllm.model_executor.layers.fused_moe.layer import FusedMoE

E, H, I = 4, 16, 8


def _loaded(activation="silu", **kw) -> FusedMoE:
    w = random_weights(E, H, I, activation, False, torch.Generator().manual_seed(0))
    layer = FusedMoE(E, 2, H, I, params_dtype=torch.float32, activation=activation, moe_backend="torch",
                     lora_enabled=True, prefix="model.layers.3.mlp.experts", **kw)
    layer.load_fused_experts(gate_up=w.w13, down=w.w2)
    return layer


def test_forward_before_finalisation_is_a_clear_error_and_builds_nothing():
    layer = _loaded()
    x, logits = torch.randn(3, H), torch.randn(3, E)
    with pytest.raises(RuntimeError, match=r"model\.layers\.3\.mlp\.experts.*process_weights_after_loading"):
        layer(x, logits)
    assert not layer.is_finalized
    with pytest.raises(RuntimeError, match="process_weights_after_loading"):
        _ = layer.experts
    layer.process_weights_after_loading()
    assert layer.is_finalized and type(layer.experts).__name__ == "TorchExperts"
    method = layer.quant_method
    layer.process_weights_after_loading()  # a second call changes nothing
    assert layer.quant_method is method
    assert layer(x, logits).shape == (3, H)


@pytest.mark.parametrize("cls, activation", [(FusedMoEWithLoRA, "silu"), (FusedMoE3DWithLoRA, "swigluoai")])
def test_lora_wrapping_needs_a_finalised_layer_and_changes_nothing(cls, activation):
    layer = _loaded(activation)
    with pytest.raises(RuntimeError, match=r"not finalised.*process_weights_after_loading"):
        cls(layer)
    assert not layer.is_finalized and layer.lora_context is None
    layer.process_weights_after_loading()
    method = layer.quant_method
    wrapped = cls(layer)
    assert wrapped.base_layer is layer and layer.quant_method is method and layer.lora_context is None


def test_tp_slicing_api():
    rows = torch.arange(4 * I).reshape(2 * 2 * I, 1)  # one expert's full w13 rows at I = 2 * 4
    layer = FusedMoE(E, 2, H, 2 * I, params_dtype=torch.float32, moe_backend="torch", tp_size=2, tp_rank=1)
    assert layer.tp_slice(2 * I) == slice(I, 2 * I)
    gate, up = list(range(2 * I)), list(range(2 * I, 4 * I))
    assert layer.shard_w13(rows).flatten().tolist() == gate[I:] + up[I:]  # rank 1's half of gate, then of up
    oai = FusedMoE(E, 2, H, 2 * I, params_dtype=torch.float32, moe_backend="torch", activation="swigluoai",
                   tp_size=2, tp_rank=1)
    assert oai.shard_w13(rows).flatten().tolist() == list(range(2 * I, 4 * I))  # interleaved pairs: one block
