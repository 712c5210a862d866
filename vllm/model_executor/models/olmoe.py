"""OLMoE (``OlmoeForCausalLM``).

Unlike Qwen3, ``q_norm`` / ``k_norm`` normalise the whole projected q
[num_heads * head_dim] and k [num_kv_heads * head_dim] (one RMS over all heads),
before RoPE; ``clip_qkv`` (when set) then clamps q, k and v.  Every layer is
sparse; experts have ``intermediate_size``; routing renormalises only with
``norm_topk_prob`` (False in the released models).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.common import BuildArgs, DecoderAttention, MoEForCausalLM, SparseMoeBlock
from vllm.model_executor.models.utils import head_dim_of


class OlmoeForCausalLM(MoEForCausalLM):
    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        bias = bool(getattr(hf, "attention_bias", False))
        return DecoderAttention(hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf),
                                rotary_emb=rope, args=args, qkv_bias=bias, o_bias=bias, qk_norm="full",
                                rms_norm_eps=hf.rms_norm_eps, clip_qkv=getattr(hf, "clip_qkv", None), prefix=prefix)

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        return SparseMoeBlock(hf.hidden_size, hf.num_experts, hf.num_experts_per_tok, hf.intermediate_size,
                              renormalize=bool(getattr(hf, "norm_topk_prob", False)), args=args, prefix=prefix)
