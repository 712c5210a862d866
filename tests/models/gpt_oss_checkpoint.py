"""A tiny random gpt-oss checkpoint made with transformers (float32, eager attention).

Three layers (sliding, full, sliding) with a window of 5 positions, so prompts of a dozen tokens
and their continuations reach past it; YaRN RoPE; 4 q / 2 kv heads of 16; 4 experts of I=96 (H=64: no two expert dims equal, so a transposed layout cannot load), top 2, with
biases; sinks drawn large (std 2) so that they visibly take part of each head's softmax.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.models.hf_checkpoints import COMMON, randomize_

WINDOW = 5
GPT_OSS = dict(num_hidden_layers=3, head_dim=16, intermediate_size=96, num_local_experts=4, sliding_window=WINDOW,
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "original_max_position_embeddings": 32, "truncate": False})


def gpt_oss_config(**overrides):
    return AutoConfig.for_model("gpt_oss", **{**COMMON, **GPT_OSS, **overrides})


@torch.no_grad()
def make_gpt_oss_checkpoint(folder, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(gpt_oss_config(**overrides), dtype=torch.float32,
                                             attn_implementation="eager")
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            p.copy_(torch.randn(p.shape, generator=g) * 2.0)
        elif name.endswith("mlp.router.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # routing far from ties
        elif name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)  # reach the activation's clamp now and then
    model.eval()
    model.save_pretrained(folder)
    return model
