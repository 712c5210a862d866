"""The int4 stream decoder and the loader: grouping, what reaches the experts, and clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.quantization.int4_checkpoints import pack_gptq, random_int4, reference_dequantize, write_int4_checkpoint
from tests.quantization.int4_stand_in import install_stand_in
from vllm.model_executor.layers.quantization.gptq import GPTQConfig
from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.model_loader.int4_weights import decode_int4_weights

EXPERT = "model.layers.1.mlp.experts.7.down_proj"
DENSE = "model.layers.1.self_attn.o_proj"


def _gptq(**kw):
    return GPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": False, **kw})


def _stream(module, tensors):
    return [(f"{module}.{k}", v) for k, v in tensors.items()]


def test_stream_gives_experts_int4_and_dense_modules_float():
    raw_e, raw_d = random_int4(64, 32, 16, asym=True, seed=1), random_int4(64, 64, 16, asym=True, seed=2)
    norm = torch.randn(64)
    stream = [("model.norm.weight", norm)] + _stream(EXPERT, pack_gptq(raw_e)) + _stream(DENSE, pack_gptq(raw_d))
    out = dict(decode_int4_weights(stream, _gptq(), torch.bfloat16))
    assert set(out) == {"model.norm.weight", f"{EXPERT}.weight", f"{DENSE}.weight"}
    assert out["model.norm.weight"] is norm
    expert = out[f"{EXPERT}.weight"]
    assert isinstance(expert, Int4Weight) and torch.equal(expert.dequantize(), reference_dequantize(raw_e, "gptq"))
    dense = out[f"{DENSE}.weight"]
    assert dense.dtype == torch.bfloat16
    assert torch.equal(dense, reference_dequantize(raw_d, "gptq", torch.bfloat16))


def test_a_module_is_emitted_when_complete_and_g_idx_may_be_absent():
    raw = random_int4(16, 32, 16, asym=True)
    tensors = pack_gptq(raw)
    del tensors["g_idx"]  # desc_act false: g_idx is optional; the module comes out at the end of the stream
    seen = []

    def stream():
        for item in _stream(DENSE, tensors):
            yield item
        seen.append("end")

    out = list(decode_int4_weights(stream(), _gptq(), torch.float32))
    assert seen == ["end"] and [k for k, _ in out] == [f"{DENSE}.weight"]
    full = list(decode_int4_weights(iter(_stream(DENSE, pack_gptq(raw)) + [("x", torch.ones(1))]), _gptq(),
                                    torch.float32))
    assert [k for k, _ in full] == [f"{DENSE}.weight", "x"]  # emitted before the next key is read


def test_stream_errors_name_the_module():
    tensors = pack_gptq(random_int4(16, 32, 16, asym=True))
    partial = {k: v for k, v in tensors.items() if k != "qzeros"}
    with pytest.raises(ValueError, match=rf"GPTQ module '{DENSE}': the checkpoint has .* but not \['qzeros'\]"):
        list(decode_int4_weights(_stream(DENSE, partial), _gptq(), torch.float32))
    with pytest.raises(ValueError, match="is stored GPTQ-quantized, but the checkpoint's quantization_config lists "
                                         "it as not quantized"):
        list(decode_int4_weights(_stream(DENSE, tensors), _gptq(dynamic={"-:.*o_proj": {}}), torch.float32))
    with pytest.raises(ValueError, match="appears twice"):
        list(decode_int4_weights(_stream(DENSE, tensors) + [(f"{DENSE}.scales", tensors["scales"])], _gptq(),
                                 torch.float32))
    with pytest.raises(ValueError, match="group size 16 does not divide the input dimension 24"):
        bad = pack_gptq(random_int4(16, 24, 8, asym=True))
        list(decode_int4_weights(_stream(DENSE, bad), _gptq(), torch.float32))


def test_get_moe_method_builds_the_int4_method(monkeypatch):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig

    stand_in = install_stand_in(monkeypatch)
    cfg = FusedMoEConfig(num_experts=4, experts_per_token=2, hidden_dim=64, intermediate_size=32)
    method = _gptq(desc_act=True).get_moe_method(cfg, "model.layers.1.mlp.experts")
    assert isinstance(method, stand_in) and method.args == (16, True, True)
    mixtral = _gptq(sym=True, group_size=-1).get_moe_method(cfg, "model.layers.0.block_sparse_moe.experts")
    assert mixtral.args == (-1, False, False)
    assert _gptq(dynamic={"-:.*experts": {}}).get_moe_method(cfg, "model.layers.1.mlp.experts") is None
    with pytest.raises(ValueError, match=r"experts of 'model.layers.1.mlp.experts' are not all quantized the same "
                                         r"way \(e.g. .* is quantized but 'model.layers.1.mlp.experts.3.down_proj'"):
        _gptq(dynamic={r"-:.*experts\.3\.down": {}}).get_moe_method(cfg, "model.layers.1.mlp.experts")


@pytest.fixture
def int4_qwen3(tmp_path, monkeypatch):
    install_stand_in(monkeypatch)
    path, _, _ = tiny_model_dir("qwen3_moe", tmp_path / "float")
    out = str(tmp_path / "int4")
    write_int4_checkpoint(path, out, str(tmp_path / "deq"), "gptq", group_size=16, asym=True)
    return out


def _rewrite(folder, edit):
    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _load(folder):
    from vllm.config.model import ModelConfig
    from vllm.model_executor.model_loader import get_model

    return get_model(ModelConfig(folder))


def test_missing_last_expert_is_reported(int4_qwen3):
    _rewrite(int4_qwen3, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{EXPERT}.")])
    with pytest.raises(ValueError, match=r"does not provide .*model.layers.1.mlp.experts.w13_weight"):
        _load(int4_qwen3)


def test_float_expert_weight_for_quantized_experts_is_refused(int4_qwen3):
    def to_float(t):
        for k in [k for k in t if k.startswith(f"{EXPERT}.")]:
            t.pop(k)
        t[f"{EXPERT}.weight"] = torch.zeros(64, 32)

    _rewrite(int4_qwen3, to_float)
    with pytest.raises(ValueError, match=rf"'{EXPERT}.weight' is a float expert weight, but the checkpoint's "
                                         "quantization_config says the experts of .* are quantized"):
        _load(int4_qwen3)


def test_quantized_experts_for_float_layers_are_refused(int4_qwen3):
    """The config (hand-edited here) says the experts are float, the weights are packed."""
    cfg_file = os.path.join(int4_qwen3, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["quantization_config"]["dynamic"] = {"-:.*experts": {}}
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="lists it as not quantized"):
        _load(int4_qwen3)
