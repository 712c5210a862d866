"""Checkpoint loading: sharded files, tied embeddings, dtype, and the errors a bad checkpoint gives."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.hf_checkpoints import PagedRunner, make_checkpoint, single_thread  # noqa: F401
from tests.utils import assert_close
from vllm.config.model import ModelConfig, resolve_dtype
from vllm.model_executor.model_loader import get_model
from vllm.model_executor.models.registry import ModelRegistry

PROMPTS = [[3, 17, 101, 5, 64], [9, 2, 77]]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3")
    return folder, make_checkpoint("qwen3_moe", folder)


def _prefill(folder, **kw):
    cfg = ModelConfig(str(folder), **kw)
    model = get_model(cfg, device="cpu")
    runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                         num_seqs=len(PROMPTS))
    return runner.prefill(PROMPTS)


def _hf_logits(hf):
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in PROMPTS]


def _rewrite(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with its tensors passed through ``edit(dict) -> dict``."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def test_model_config_reads_checkpoint(qwen3):
    folder, hf = qwen3
    cfg = ModelConfig(str(folder))
    assert cfg.architectures == ["Qwen3MoeForCausalLM"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (64, 2, 2, 16, 128)
    assert cfg.dtype == torch.float32 and cfg.max_model_len == 128 and cfg.eos_token_id is None
    assert ModelConfig(str(folder), max_model_len=32).max_model_len == 32
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelConfig(str(folder), max_model_len=129)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig(str(folder / "nowhere"))


@pytest.mark.parametrize("requested, expected", [
    ("auto", torch.float32), ("float32", torch.float32), ("float", torch.float32), ("bfloat16", torch.bfloat16),
    ("float16", torch.float16), ("half", torch.float16), ("BFloat16", torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_resolution(qwen3, requested, expected):
    assert ModelConfig(str(qwen3[0]), dtype=requested).dtype == expected


def test_dtype_resolution_rules():
    assert resolve_dtype("auto", "bfloat16", on_gpu=False) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, on_gpu=True) == torch.float16
    assert resolve_dtype("auto", "float32", on_gpu=True) == torch.float32  # float32 checkpoints stay float32
    assert resolve_dtype("auto", None, on_gpu=True) == torch.bfloat16
    assert resolve_dtype("auto", None, on_gpu=False) == torch.float32
    for bad in ("int8", "fp8", torch.int8):
        with pytest.raises(ValueError, match="dtype"):
            resolve_dtype(bad, None, on_gpu=False)


def test_bfloat16_model_from_float32_checkpoint(qwen3):
    folder, hf = qwen3
    got = _prefill(folder, dtype="bfloat16")
    assert got[0].dtype == torch.bfloat16  # the logits keep the model dtype (consumers widen them exactly)
    for g, ref in zip(got, _hf_logits(hf)):
        assert_close(g.float(), ref, torch.bfloat16)


def test_sharded_checkpoint_with_index(qwen3, tmp_path):
    folder, hf = qwen3
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    for g, ref in zip(_prefill(tmp_path), _hf_logits(hf)):
        assert_close(g, ref, torch.float32)


def test_tied_word_embeddings(tmp_path):
    hf = make_checkpoint("qwen3_moe", tmp_path, tie_word_embeddings=True)
    model = get_model(ModelConfig(str(tmp_path)), device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for g, ref in zip(_prefill(tmp_path), _hf_logits(hf)):
        assert_close(g, ref, torch.float32)


@pytest.mark.parametrize("drop, missing", [
    ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.qkv_proj.weight"),
    ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.experts.w13_weight"),
    ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
])
def test_missing_key_is_reported(qwen3, tmp_path, drop, missing):
    folder = _rewrite(qwen3[0], tmp_path / "ckpt", lambda sd: {k: v for k, v in sd.items() if k != drop})
    with pytest.raises(ValueError, match="does not provide 1 parameter") as err:
        get_model(ModelConfig(str(folder)), device="cpu")
    assert missing in str(err.value)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.bogus.weight", "model.layers.1.mlp.experts.9.gate_proj.weight",
                                 "model.layers.0.self_attn.q_proj.lora_A.weight"])
def test_unknown_key_is_an_error(qwen3, tmp_path, key):
    def add(sd):
        sd[key] = torch.zeros(4, 4)
        return sd
    folder = _rewrite(qwen3[0], tmp_path / "ckpt", add)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        get_model(ModelConfig(str(folder)), device="cpu")


def test_wrong_shape_names_the_key(qwen3, tmp_path):
    key = "model.layers.0.self_attn.q_norm.weight"

    def edit(sd):
        sd[key] = torch.ones(8)
        return sd
    folder = _rewrite(qwen3[0], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        get_model(ModelConfig(str(folder)), device="cpu")


def test_half_of_fused_experts_is_an_error(qwen3, tmp_path):
    folder, hf = qwen3
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not k.endswith("experts.down_proj")}
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="down_proj"):
        get_model(ModelConfig(str(tmp_path)), device="cpu")


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="Qwen3MoeForCausalLM") as err:
        ModelRegistry.resolve(["LlamaForCausalLM"])
    assert "LlamaForCausalLM" in str(err.value)
    assert ModelRegistry.resolve(["Foo", "OlmoeForCausalLM"]).__name__ == "OlmoeForCausalLM"
