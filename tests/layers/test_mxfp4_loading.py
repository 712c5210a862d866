"""Mxfp4Config parsing, the MXFP4 loader's checks, and the MXFP4 backend oracle."""
import logging
from types import SimpleNamespace

import pytest
import torch

from tests.layers.mxfp4_setup import PREFIX, make_mxfp4_layer, random_mxfp4_checkpoint
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
from vllm.model_executor.layers.fused_moe.experts.mxfp4_experts_base import mxfp4_moe_quant_config
from vllm.model_executor.layers.fused_moe.experts.oai_triton_experts import UnfusedOAITritonExperts
from vllm.model_executor.layers.fused_moe.experts.torch_mxfp4_experts import TorchMxfp4Experts
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.fused_moe.mxfp4_fused_moe_method import Mxfp4FusedMoEMethod
from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import Mxfp4MoEBackend, select_mxfp4_moe_backend
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.mxfp4 import Mxfp4Config



def test_config_from_checkpoint_and_exclusions():
    hf = SimpleNamespace(quantization_config={"quant_method": "mxfp4",
                                              "modules_to_not_convert": ["self_attn", "mlp.router",
                                                                         "model.embed_tokens", "lm_head",
                                                                         "model.layers.1.mlp.experts"]})
    cfg = get_quantization_config(hf)
    assert isinstance(cfg, Mxfp4Config)
    assert not cfg.is_quantized("model.layers.0.self_attn.q_proj")
    assert not cfg.is_quantized("model.layers.0.mlp.router")
    assert not cfg.is_quantized("lm_head")
    assert cfg.is_quantized("model.layers.0.mlp.experts")
    moe = FusedMoEConfig(num_experts=4, experts_per_token=2, hidden_dim=32, intermediate_size=32,
                         activation="swigluoai", has_bias=True)
    assert isinstance(cfg.get_moe_method(moe, "model.layers.0.mlp.experts"), Mxfp4FusedMoEMethod)
    assert cfg.get_moe_method(moe, "model.layers.1.mlp.experts") is None  # excluded: float experts
    assert cfg.get_moe_method(moe, "model.layers.11.mlp.experts") is not None  # not a prefix match on "1"


def test_wildcard_exclusions_as_gpt_oss_writes_them():
    cfg = Mxfp4Config.from_config({"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    assert not cfg.is_quantized("model.layers.17.self_attn.o_proj")
    assert not cfg.is_quantized("model.layers.3.mlp.router")
    assert not cfg.is_quantized("model.embed_tokens")
    assert cfg.is_quantized("model.layers.3.mlp.experts")


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="modules_to_not_convert must be a list"):
        Mxfp4Config.from_config({"quant_method": "mxfp4", "modules_to_not_convert": "lm_head"})
    with pytest.raises(ValueError, match="'mxfp4'"):
        Mxfp4Config.from_config({"quant_method": "gptq"})


def _layer(device="cpu", **kw):
    return FusedMoE(4, 2, 32, 64, params_dtype=torch.float32, device=device, activation="swigluoai",
                    has_bias=kw.pop("has_bias", True), quant_config=Mxfp4Config(), prefix=PREFIX, **kw)


def test_created_parameters_have_the_checkpoint_shapes():
    layer = _layer(tp_size=2, tp_rank=0)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"w13_blocks": (4, 64, 1, 16), "w13_scales": (4, 64, 1), "w2_blocks": (4, 32, 1, 16),
                      "w2_scales": (4, 32, 1), "w13_bias": (4, 64), "w2_bias": (4, 32)}
    assert all(hasattr(p, "weight_loader") for p in layer.parameters())


def test_parameter_weight_loaders_load_the_checkpoint_tensors():
    gen = torch.Generator().manual_seed(0)
    ck = random_mxfp4_checkpoint(4, 32, 64, True, gen)
    layer = _layer(tp_size=2, tp_rank=1)
    names = {"gate_up_proj_blocks": "w13_blocks", "gate_up_proj_scales": "w13_scales", "gate_up_proj_bias": "w13_bias",
             "down_proj_blocks": "w2_blocks", "down_proj_scales": "w2_scales", "down_proj_bias": "w2_bias"}
    for suffix, name in names.items():
        p = getattr(layer, name)
        p.weight_loader(p, ck[suffix])
    assert torch.equal(layer.w13_blocks, ck["gate_up_proj_blocks"][:, 64:])
    assert torch.equal(layer.w2_scales, ck["down_proj_scales"][:, :, 1:])
    assert not layer.w2_bias.any(), "TP rank 1: the all-reduced down bias is added on rank 0 only"


def test_tp_split_inside_a_scale_group_is_a_clear_error():
    with pytest.raises(ValueError, match=r"64 / 4 = 16\) must be a multiple of 32"):
        _layer(tp_size=4, tp_rank=0)


def test_loader_errors_name_the_problem():
    gen = torch.Generator().manual_seed(1)
    ck = random_mxfp4_checkpoint(4, 32, 64, True, gen)
    layer = _layer()
    load = layer.quant_method.load_checkpoint_tensor
    with pytest.raises(ValueError, match=r"expected shape \(4, 128, 1, 16\)"):
        load(layer, "gate_up_proj_blocks", ck["gate_up_proj_blocks"][:3])
    with pytest.raises(ValueError, match="must be uint8"):
        load(layer, "down_proj_scales", ck["down_proj_scales"].float())
    with pytest.raises(ValueError, match="unknown MXFP4 expert tensor 'gate_up_proj'"):
        load(layer, "gate_up_proj", ck["gate_up_proj_blocks"])
    no_bias = _layer(has_bias=False)
    with pytest.raises(ValueError, match="without biases"):
        no_bias.quant_method.load_checkpoint_tensor(no_bias, "down_proj_bias", ck["down_proj_bias"])


def _moe(**kw):
    return FusedMoEConfig(num_experts=4, experts_per_token=2, hidden_dim=32, intermediate_size=32,
                          activation="swigluoai", has_bias=True, in_dtype=torch.float32, **kw)


def _qc():
    z = torch.zeros(1, dtype=torch.uint8)
    return mxfp4_moe_quant_config(z, z, None, None)


def test_oracle_logs_its_choice_and_refuses_what_cannot_run(caplog, monkeypatch):
    with caplog.at_level(logging.DEBUG, logger="vllm"):
        assert select_mxfp4_moe_backend(_moe(), _qc(), "cpu") is Mxfp4MoEBackend.TORCH
        assert select_mxfp4_moe_backend(_moe(lora_enabled=True), _qc(), "cuda") is Mxfp4MoEBackend.TRITON
    assert any("MXFP4 experts: using backend torch" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="'naive_dense' was requested, but it cannot run MXFP4.*torch"):
        select_mxfp4_moe_backend(_moe(moe_backend="naive_dense"), _qc(), "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="'triton' was requested but cannot run.*CUDA device"):
        select_mxfp4_moe_backend(_moe(moe_backend="triton"), _qc(), "cpu")


def test_experts_report_lora_and_quant_support_truthfully():
    assert UnfusedOAITritonExperts.supports_lora() and TorchMxfp4Experts.supports_lora()
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    assert not UnfusedOAITritonExperts.supports_quant(FusedMoEQuantConfig())
    assert UnfusedOAITritonExperts.supports_quant(_qc())


def test_requested_backend_on_the_layer(device):
    gen = torch.Generator().manual_seed(2)
    ck = random_mxfp4_checkpoint(4, 32, 32, True, gen)
    layer = make_mxfp4_layer(ck, 2, torch.float32, device, backend="triton")
    assert isinstance(layer.quant_method.kernel.fused_experts, UnfusedOAITritonExperts)
    assert layer.quant_method.supports_lora()


def test_float_experts_cannot_be_loaded_into_an_mxfp4_layer():
    gen = torch.Generator().manual_seed(3)
    ck = random_mxfp4_checkpoint(4, 32, 64, True, gen)
    for processed in (False, True):  # before and after w13_weight names the uint8 blocks
        layer = make_mxfp4_layer(ck, 2, torch.float32, "cpu", backend="torch") if processed else _layer()
        with pytest.raises(ValueError, match="stored quantized"):
            layer.load_fused_experts(gate_up=torch.randn(4, 128, 32), down=torch.randn(4, 32, 64))
