"""gpt-oss against transformers: its pieces (YaRN RoPE, router, clamped SwiGLU) and the whole model.

The model runs a tiny random float32 checkpoint (``gpt_oss_checkpoint``: window 5, sinks drawn
large) through the paged KV cache: prompts longer than the window, prefill logits, then greedy
decoding (the same tokens as transformers' ``generate``, close logits), in both attention backends
on the CPU (the Triton one under the interpreter) and on a GPU where one is present.
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models.gpt_oss_checkpoint import WINDOW, gpt_oss_config, make_gpt_oss_checkpoint
from tests.models.hf_checkpoints import (PagedRunner, assert_kernels_on_gpu, check_paged_greedy_against_hf,
                                         single_thread)  # noqa: F401  (single_thread: fixture)
from tests.utils import assert_close
from vllm.config.model import ModelConfig
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader import get_model

PROMPTS = [[3, 17, 101, 5, 64, 9, 2, 77, 120, 33, 33, 8, 45], [9, 2, 77], [50, 51, 52, 1, 2, 3, 4, 5, 6, 7]]
NEW_TOKENS = 9


# ---- pieces --------------------------------------------------------------------------
@pytest.mark.parametrize("params,head_dim,max_pos", [
    # gpt-oss-20b / 120b as released
    ({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
      "original_max_position_embeddings": 4096, "truncate": False}, 64, 131072),
    # defaults for beta_* and truncate (True), an explicit attention_factor
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 256,
      "attention_factor": 1.3}, 32, 4096),
    # mscale / mscale_all_dim (DeepSeek style)
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
      "mscale": 1.0, "mscale_all_dim": 0.5}, 16, 1024),
])
def test_yarn_cos_sin_match_transformers(params, head_dim, max_pos):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    cfg = gpt_oss_config(head_dim=head_dim, max_position_embeddings=max_pos, rope_parameters=dict(params))
    ref = GptOssRotaryEmbedding(cfg)
    rope = get_rope(head_dim, max_pos, params["rope_theta"], dict(params))
    positions = torch.tensor([0, 1, 7, 100, max_pos // 3, max_pos - 1])
    cos, sin = ref(torch.zeros(1, dtype=torch.float32), positions[None])
    assert torch.equal(rope.cos_cache[positions], cos[0]) and torch.equal(rope.sin_cache[positions], sin[0])
    assert ref.attention_scaling != 1.0


def test_swigluoai_matches_transformers_experts():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(gpt_oss_config())
    x = torch.randn(64, 2 * 96) * 6  # past the clamp (7) on both sides
    assert_close(moe_activation(MoEActivation.SWIGLUOAI, x), experts._apply_gate(x), torch.float32)


def test_router_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    router = GptOssTopKRouter(gpt_oss_config(num_local_experts=8, num_experts_per_tok=3))
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
    x = torch.randn(20, 64)
    _, scores, ids = router(x)
    weights, our_ids = fused_topk(x @ router.weight.T, 3, renormalize=False, topk_then_softmax=True,
                                  router_bias=router.bias)
    assert torch.equal(our_ids.long(), ids)
    assert_close(weights, scores, torch.float32)


# ---- the model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    return folder, make_gpt_oss_checkpoint(folder)


BACKENDS = ["torch", "triton", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_and_greedy_decode_match_transformers(checkpoint, backend, monkeypatch):
    folder, hf = checkpoint
    assert max(map(len, PROMPTS)) > WINDOW and hf.config.layer_types[0] == "sliding_attention"
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs the interpreter (CPU machines); here the cuda case runs it")
    if backend != "cuda":
        monkeypatch.setenv("VLLM_ATTENTION_BACKEND", backend)
    cfg = ModelConfig(str(folder), dtype="float32")
    model = get_model(cfg, device=device)
    runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                         num_seqs=len(PROMPTS))
    if backend == "cuda":
        assert_kernels_on_gpu(model)  # the attention backend is chosen when the runner binds the caches
    check_paged_greedy_against_hf(runner, hf, PROMPTS, NEW_TOKENS, "gpt-oss")


def test_window_and_sinks_matter(checkpoint, tmp_path):
    """The same weights with the window widened or the sinks zeroed give other logits (so the parity
    above checks both)."""
    folder, hf = checkpoint
    base = torch.cat(_prefill(folder))
    wide = _variant(folder, tmp_path / "wide", config={"sliding_window": 1000})
    assert not torch.allclose(base, torch.cat(_prefill(wide)), atol=1e-3)
    no_sinks = _variant(folder, tmp_path / "nosinks", tensors=lambda k, v: v * 0 if k.endswith("sinks") else v)
    assert not torch.allclose(base, torch.cat(_prefill(no_sinks)), atol=1e-3)


def _prefill(folder) -> list[torch.Tensor]:
    cfg = ModelConfig(str(folder), dtype="float32")
    model = get_model(cfg, device="cpu")
    return PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                       num_seqs=len(PROMPTS)).prefill(PROMPTS)


def _variant(folder, dst, *, config=None, tensors=None, drop=()):
    dst.mkdir()
    conf = json.loads((folder / "config.json").read_text())
    conf.update(config or {})
    (dst / "config.json").write_text(json.dumps(conf))
    state = load_file(str(folder / "model.safetensors"))
    state = {k: (tensors(k, v) if tensors else v).contiguous() for k, v in state.items()
             if not any(k.endswith(d) for d in drop)}
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_checkpoint_errors(checkpoint, tmp_path):
    folder, _ = checkpoint
    missing = _variant(folder, tmp_path / "missing", drop=("layers.1.mlp.experts.down_proj_bias",))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts.*down_proj_bias"):
        get_model(ModelConfig(str(missing)), device="cpu")
    wrong = _variant(folder, tmp_path / "wrong",
                     tensors=lambda k, v: v[:, :, :100] if k.endswith("experts.gate_up_proj") else v)
    with pytest.raises(ValueError, match=r"gate_up_proj: expected shape \(4, 64, 192\).*got \(4, 64, 100\)"):
        get_model(ModelConfig(str(wrong)), device="cpu")
    # MXFP4 expert keys in a checkpoint whose config does not say mxfp4
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 192, 2, 16, dtype=torch.uint8)
    mx = tmp_path / "mx"
    mx.mkdir()
    save_file(state, str(mx / "model.safetensors"))
    (mx / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="MXFP4"):
        get_model(ModelConfig(str(mx)), device="cpu")


def test_config_checks():
    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

    with pytest.raises(NotImplementedError, match="swiglu_limit"):
        GptOssForCausalLM(gpt_oss_config(swiglu_limit=5.0), dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="layer_types"):
        GptOssForCausalLM(gpt_oss_config(layer_types=["chunked_attention"] * 3), dtype=torch.float32)
    model = GptOssForCausalLM(gpt_oss_config(), dtype=torch.float32)
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [WINDOW, None, WINDOW]
    assert all(layer.self_attn.sinks.shape == (4,) for layer in model.model.layers)
    assert math.isclose(model.model.layers[0].self_attn.attn.scale, 16 ** -0.5)


def test_released_config_format():
    """config.json as gpt-oss-20b ships it (transformers 4.55: ``rope_scaling`` + ``rope_theta``, no
    ``rope_parameters``), at a small size: windows per layer, and YaRN cos/sin equal transformers'."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

    released = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
                "experts_per_token": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
                "initial_context_length": 4096, "intermediate_size": 64, "max_position_embeddings": 131072,
                "layer_types": ["sliding_attention", "full_attention"], "model_type": "gpt_oss",
                "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 2,
                "num_local_experts": 4, "rms_norm_eps": 1e-05, "rope_theta": 150000, "sliding_window": 128,
                "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                 "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
                "swiglu_limit": 7.0, "tie_word_embeddings": False, "vocab_size": 128}
    cfg = GptOssConfig.from_dict(released)
    model = GptOssForCausalLM(cfg, dtype=torch.float32)
    assert [layer.self_attn.attn.sliding_window for layer in model.model.layers] == [128, None]
    rope = model.model.layers[0].self_attn.rotary_emb
    positions = torch.tensor([0, 5, 4095, 4096, 100000, 131071])
    cos, sin = GptOssRotaryEmbedding(cfg)(torch.zeros(1), positions[None])
    assert torch.equal(rope.cos_cache[positions], cos[0]) and torch.equal(rope.sin_cache[positions], sin[0])
