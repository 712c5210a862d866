"""PEFT adapter loading: real peft 0.21 adapters on tiny random transformers models.

Every module's W + delta (from our loader) must equal peft's ``merge_and_unload()``
weights.  The older per-expert layout (and Mixtral's w1/w3/w2 names) is built
from the same random A/B and must give the same deltas as the fused layout.
Every validation error is triggered once.
"""
import json
import os
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.utils import assert_close
from vllm.lora.lora_weights import LoRAModuleSpec, MoELoRALayerWeights, MoELoRAModuleSpec
from vllm.lora.peft_loader import LoRALoadError, load_peft_adapter

H, I, E, LAYERS = 48, 32, 4, 2
# Both sides compute in fp32 on the CPU; only the summation order differs.
FP32_EXACT = (1e-5, 1e-6)


def tiny_qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=H, intermediate_size=96, moe_intermediate_size=I,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                         num_experts=E, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def module_table(moe_block: str = "mlp", dense=("q_proj", "k_proj", "v_proj", "o_proj")) -> dict:
    sizes = {"q_proj": (H, 48), "k_proj": (H, 24), "v_proj": (H, 24), "o_proj": (48, H)}
    table = {}
    for i in range(LAYERS):
        for n in dense:
            table[f"model.layers.{i}.self_attn.{n}"] = LoRAModuleSpec(*sizes[n])
        table[f"model.layers.{i}.{moe_block}.experts"] = MoELoRAModuleSpec(E, H, I, gated=True, w13_slices=2)
    return table


def make_adapter(folder, *, seed=0, **lora_kwargs):
    """Save a peft adapter with random A and B; return (base state dict, merged state dict)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_qwen3_moe(seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
              target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    kw.update(lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
        peft_model.save_pretrained(str(folder))
        merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, merged


def check_against_merge(lora, base, merged, moe_block="mlp"):
    checked = 0
    for name, w in lora.loras.items():
        if isinstance(w, MoELoRALayerWeights):
            hf = name.replace(f".{moe_block}.", ".mlp.")
            for param, delta in (("gate_up_proj", w.w13_delta()), ("down_proj", w.w2_delta())):
                key = f"{hf}.{param}"
                assert_close(delta, merged[key] - base[key], bounds=FP32_EXACT, name=key)
        else:
            key = f"{name}.weight"
            assert_close(w.delta_weight(), merged[key] - base[key], bounds=FP32_EXACT, name=key)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def fused_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fused")
    base, merged = make_adapter(folder)
    return folder, base, merged


def test_fused_experts_and_attention_match_merge(fused_adapter):
    folder, base, merged = fused_adapter
    lora = load_peft_adapter(str(folder), module_table(), max_lora_rank=16, lora_int_id=3)
    assert lora.lora_int_id == 3 and lora.rank == 4
    assert check_against_merge(lora, base, merged) == LAYERS * 5
    moe = lora.loras["model.layers.0.mlp.experts"]
    assert [tuple(t.shape) for t in moe.w13_lora_a] == [(E, 4, H)]
    assert [tuple(t.shape) for t in moe.w13_lora_b] == [(E, 2 * I, 4)]
    assert tuple(moe.w2_lora_a.shape) == (E, 4, I) and tuple(moe.w2_lora_b.shape) == (E, H, 4)


@pytest.mark.parametrize("kw", [
    dict(use_rslora=True, r=8, lora_alpha=4),
    dict(rank_pattern={"o_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3, "gate_up_proj": 5}),
    dict(target_parameters=["mlp.experts.gate_up_proj"]),  # one fused param: ".experts.lora_A" is gate_up here
    dict(target_parameters=["mlp.experts.down_proj"], target_modules=["v_proj"]),
])
def test_scaling_patterns_and_partial_targets_match_merge(tmp_path, kw):
    base, merged = make_adapter(tmp_path, seed=1, **kw)
    lora = load_peft_adapter(str(tmp_path), module_table(), max_lora_rank=16)
    assert check_against_merge(lora, base, merged) == len(lora.loras) > 0


@pytest.mark.parametrize("names", ["qwen", "mixtral"])
def test_per_expert_layout_equals_fused(fused_adapter, tmp_path, names):
    from tests.entrypoints.lora_adapters import to_per_expert_layout

    """Per-expert keys made from the fused adapter's A/B: gate and up share A_e, B_e split by rows."""
    folder, _, _ = fused_adapter
    block, proj = ("mlp", ("gate_proj", "up_proj", "down_proj")) if names == "qwen" else \
        ("block_sparse_moe", ("w1", "w3", "w2"))
    to_per_expert_layout(folder, str(tmp_path / "per_expert"), E, H, I, block, proj)
    table = module_table(block)
    per_expert = load_peft_adapter(str(tmp_path / "per_expert"), table, max_lora_rank=16)
    reference = load_peft_adapter(str(folder), table, max_lora_rank=16)  # fused keys resolve "mlp" -> block too
    for name, w in per_expert.loras.items():
        ref = reference.loras[name]
        if isinstance(w, MoELoRALayerWeights):
            assert len(w.w13_lora_a) == 2 and len(ref.w13_lora_a) == 1
            assert_close(w.w13_delta(), ref.w13_delta(), bounds=FP32_EXACT, name=name)
            assert_close(w.w2_delta(), ref.w2_delta(), bounds=FP32_EXACT, name=name)
        else:
            assert torch.equal(w.lora_b, ref.lora_b)
    # A one-slice layer (gpt-oss style) takes a two-slice adapter at rank 2r.
    one_slice = {k: (MoELoRAModuleSpec(E, H, I, True, 1) if isinstance(v, MoELoRAModuleSpec) else v)
                 for k, v in table.items()}
    with pytest.raises(LoRALoadError, match="rank 8 > max_lora_rank=4"):
        load_peft_adapter(str(tmp_path / "per_expert"), one_slice, max_lora_rank=4)


# ---- validation ---------------------------------------------------------------------------------
def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def test_missing_files(fused_adapter, tmp_path):
    folder, _, _ = fused_adapter
    with pytest.raises(LoRALoadError, match="does not exist"):
        load_peft_adapter(str(tmp_path / "nope"), module_table(), max_lora_rank=16)
    d = _copy(folder, tmp_path / "no_config")
    os.remove(d / "adapter_config.json")
    with pytest.raises(LoRALoadError, match="no adapter_config.json"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)
    d = _copy(folder, tmp_path / "no_weights")
    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(LoRALoadError, match="no adapter_model.safetensors"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRALoadError, match="adapter_model.bin"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(fused_adapter, tmp_path, damage):
    d = _copy(fused_adapter[0], tmp_path / "corrupt")
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x13\x37" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(LoRALoadError, match="not a readable safetensors file"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)


def test_nan_weights(fused_adapter, tmp_path):
    d = _copy(fused_adapter[0], tmp_path / "nan")
    tensors = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight"
    tensors[key][3, 2] = float("inf")
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(LoRALoadError, match=f"{key} contains NaN or Inf"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool])
def test_non_float_weights_are_refused(fused_adapter, tmp_path, dtype):
    """Integer or boolean LoRA weights (issue 9: int32 weights were accepted and cast) are refused,
    naming the tensor, its dtype and the dtypes that are accepted."""
    d = _copy(fused_adapter[0], tmp_path / "int")
    tensors = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = (tensors[key] * 100).to(dtype)
    save_file(tensors, d / "adapter_model.safetensors")
    with pytest.raises(LoRALoadError, match=rf"{re.escape(key)} has dtype {str(dtype).removeprefix('torch.')}.*"
                                            r"float16, bfloat16, float32 or float64"):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load(fused_adapter, tmp_path, dtype):
    d = _copy(fused_adapter[0], tmp_path / "f")
    tensors = {k: v.to(dtype) for k, v in load_file(fused_adapter[0] / "adapter_model.safetensors").items()}
    save_file(tensors, d / "adapter_model.safetensors")
    lora = load_peft_adapter(str(d), module_table(), max_lora_rank=16)
    assert lora.rank == 4


def test_rank_above_max(fused_adapter):
    with pytest.raises(LoRALoadError, match="max_lora_rank=2.*--max-lora-rank 4"):
        load_peft_adapter(str(fused_adapter[0]), module_table(), max_lora_rank=2)


def test_wrong_shapes_for_this_model(fused_adapter):
    table = module_table()
    table["model.layers.0.self_attn.k_proj"] = LoRAModuleSpec(H, 48)
    with pytest.raises(LoRALoadError, match="k_proj.*48 -> 24.*48 -> 48"):
        load_peft_adapter(str(fused_adapter[0]), table, max_lora_rank=16)
    table = module_table()
    table["model.layers.1.mlp.experts"] = MoELoRAModuleSpec(E, H, 2 * I)
    with pytest.raises(LoRALoadError, match="fits neither gate_up"):
        load_peft_adapter(str(fused_adapter[0]), table, max_lora_rank=16)
    table["model.layers.1.mlp.experts"] = MoELoRAModuleSpec(2 * E, H, I)
    with pytest.raises(LoRALoadError, match="E=8 experts"):
        load_peft_adapter(str(fused_adapter[0]), table, max_lora_rank=16)


def test_unknown_modules(fused_adapter):
    with pytest.raises(LoRALoadError, match="does not have.*o_proj"):
        load_peft_adapter(str(fused_adapter[0]), module_table(dense=("q_proj", "k_proj", "v_proj")),
                          max_lora_rank=16)


@pytest.mark.parametrize("change,match", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]},
                                          "modules_to_save"), ({"r": 3}, "gives r=3"), ({"peft_type": "IA3"}, "LORA")])
def test_unsupported_or_inconsistent_config(fused_adapter, tmp_path, change, match):
    d = _copy(fused_adapter[0], tmp_path / "cfg")
    config = json.load(open(d / "adapter_config.json"))
    json.dump(dict(config, **change), open(d / "adapter_config.json", "w"))
    with pytest.raises(LoRALoadError, match=match):
        load_peft_adapter(str(d), module_table(), max_lora_rank=16)


def test_gpt_oss_transposed_experts_match_merge(tmp_path):
    """gpt-oss stores experts as [E, in, out] (gate/up interleaved): A is still [r*E, in], the delta transposed."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=12, num_local_experts=E, num_experts_per_tok=2,
                       layer_types=["full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj"],
                                                      target_parameters=["mlp.experts.gate_up_proj",
                                                                         "mlp.experts.down_proj"]))
        peft_model.save_pretrained(str(tmp_path))
        merged = peft_model.merge_and_unload().state_dict()
    table = {"model.layers.0.self_attn.q_proj": LoRAModuleSpec(H, 48),
             "model.layers.0.mlp.experts": MoELoRAModuleSpec(E, H, I, gated=True, w13_slices=1)}
    lora = load_peft_adapter(str(tmp_path), table, max_lora_rank=4)
    moe = lora.loras["model.layers.0.mlp.experts"]
    p = "model.layers.0.mlp.experts"
    assert_close(moe.w13_delta().transpose(1, 2), merged[f"{p}.gate_up_proj"] - base[f"{p}.gate_up_proj"],
                 bounds=FP32_EXACT)
    assert_close(moe.w2_delta().transpose(1, 2), merged[f"{p}.down_proj"] - base[f"{p}.down_proj"], bounds=FP32_EXACT)
