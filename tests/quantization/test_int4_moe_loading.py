"""Int4MoEMethod loading errors and the int4 backend oracle."""
import logging

import pytest
import torch

from tests.quantization.int4_moe_setup import FakeInt4Config, make_int4_layer, random_int4, random_int4_experts
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.fused_moe.oracle.int4 import Int4MoEBackend as B
from vllm.model_executor.layers.fused_moe.oracle.int4 import int4_experts_class, select_int4_moe_backend
from vllm.model_executor.layers.quantization.int4 import Int4Weight


def _layer(E=4, H=32, I=32, group=16, has_zeros=True, act_order=False, **kw):
    return FusedMoE(E, 2, H, I, params_dtype=torch.float32, quant_config=FakeInt4Config(group, has_zeros, act_order),
                    **kw)


def test_gate_and_up_with_different_g_idx_are_refused():
    layer = _layer(act_order=True)
    gen = torch.Generator().manual_seed(0)
    layer.quant_method.load_int4(layer, "w1", 0, random_int4(32, 32, 16, True, True, gen))
    with pytest.raises(ValueError, match="gate .w1. and up .w3. have different g_idx"):
        layer.quant_method.load_int4(layer, "w3", 0, random_int4(32, 32, 16, True, True, gen))


def test_tp_slice_not_group_aligned_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        _layer(I=96, group=32, tp_size=2)  # 48 columns per rank
    _layer(I=96, group=32, tp_size=2, act_order=True)  # act-order: the rank keeps every group


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="group size 24 does not divide the experts' hidden size 32"):
        _layer(group=24)


def test_mismatched_weights_are_refused():
    layer = _layer()
    gen = torch.Generator().manual_seed(1)
    m = layer.quant_method
    with pytest.raises(ValueError, match="expert 1 shard w1: group size 8, but the layer was built for 16"):
        m.load_int4(layer, "w1", 1, random_int4(32, 32, 8, True, False, gen))
    with pytest.raises(ValueError, match="lacks zero points"):
        m.load_int4(layer, "w1", 1, random_int4(32, 32, 16, False, False, gen))
    with pytest.raises(ValueError, match=r"expected an unsliced \[out, in\] = \[32, 32\]"):
        m.load_int4(layer, "w2", 1, random_int4(32, 16, 16, True, False, gen))
    with pytest.raises(ValueError, match="act-order"):
        m.load_int4(layer, "w2", 1, random_int4(32, 32, 16, True, True, gen))
    with pytest.raises(ValueError, match="unknown shard_id"):
        m.load_int4(layer, "w4", 1, random_int4(32, 32, 16, True, False, gen))
    with pytest.raises(ValueError, match="load through Int4MoEMethod.load_int4"):
        layer.w13_weight.weight_loader(layer.w13_weight, torch.zeros(32, 32), "w1", 0)


def test_missing_expert_is_named_at_process_time():
    gen = torch.Generator().manual_seed(2)
    ex = random_int4_experts(4, 32, 32, "silu", 16, "asym", gen)
    layer = make_int4_layer(ex, 2, "silu", 16, "asym", torch.float32, "cpu", backend=None, process=False)
    layer._int4_loaded.discard((3, "w3"))
    with pytest.raises(ValueError, match=r"1 expert projections were never loaded \(local expert 3 w3\)"):
        layer.process_weights_after_loading()


def test_other_ranks_experts_are_skipped():
    layer = _layer(ep_size=2, ep_rank=0)
    gen = torch.Generator().manual_seed(3)
    layer.quant_method.load_int4(layer, "w1", 3, random_int4(32, 32, 16, True, False, gen))  # rank 1's expert
    assert layer._int4_loaded == set()


def _cfg(**kw):
    return FusedMoEConfig(num_experts=4, experts_per_token=2, hidden_dim=32, intermediate_size=32,
                          in_dtype=torch.float16, **kw)


def _qc():
    gen = torch.Generator().manual_seed(4)
    ex = random_int4_experts(4, 32, 32, "silu", 16, "sym", gen)
    return make_int4_layer(ex, 2, "silu", 16, "sym", torch.float16, "cpu", backend="torch").quant_method.kernel \
        .fused_experts.quant_config


def test_oracle_picks_torch_on_cpu_and_marlin_on_cuda(caplog):
    qc = _qc()
    assert isinstance(qc, Int4MoEQuantConfig)
    assert select_int4_moe_backend(_cfg(lora_enabled=True), qc, "cpu") is B.TORCH
    assert int4_experts_class(B.MARLIN).supports_lora() and int4_experts_class(B.TORCH).supports_lora()
    with caplog.at_level(logging.DEBUG, logger="vllm"):
        # a CUDA priority list on CPU tensors (no interpreter assumed): MarlinExperts says why it cannot
        import vllm.platforms.interface as pi

        orig = pi.triton_interpreting
        pi.triton_interpreting = lambda: False
        try:
            assert select_int4_moe_backend(_cfg(), qc, "cpu", priority=[B.MARLIN, B.TORCH]) is B.TORCH
        finally:
            pi.triton_interpreting = orig
    assert any("skipping int4 MoE backend marlin" in r.getMessage() and "CUDA" in r.getMessage()
               for r in caplog.records)


def test_requested_backend_that_cannot_run_int4_is_refused():
    qc = _qc()
    with pytest.raises(ValueError, match="'triton' runs unquantized weights only; int4 backends: marlin, torch"):
        select_int4_moe_backend(_cfg(moe_backend="triton"), qc, "cpu")
    assert select_int4_moe_backend(_cfg(moe_backend="marlin"), qc, "cpu") is B.MARLIN  # interpreter on CPU
    # the int4 experts refuse float weights, with their reason
    answer = int4_experts_class(B.TORCH).check_config(_cfg(), FusedMoEQuantConfig(), torch.device("cpu"))
    assert not answer and "packed int4 expert weights" in answer.reason


def test_group_size_must_be_positive_or_minus_one():
    with pytest.raises(ValueError, match="positive group size, or -1"):
        _layer(group=0)
    layer = _layer(H=64, I=32, group=-1)  # one group per row: 64 input channels for w13, 32 for w2
    assert layer.w13_scales.shape[-1] == 1 and layer.w2_scales.shape[-1] == 1
    gen = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match="group size 16, but the layer was built for 64"):
        layer.quant_method.load_int4(layer, "w1", 0, random_int4(32, 64, 16, True, False, gen))
