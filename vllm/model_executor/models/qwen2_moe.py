"""Qwen2-MoE / Qwen1.5-MoE (``Qwen2MoeForCausalLM``): q/k/v biases and a shared expert.

Every sparse layer adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)`` to the
routed experts' output; ``shared_expert`` is a dense SiLU MLP of
``shared_expert_intermediate_size`` and ``shared_expert_gate`` a [1, H] projection.
Dense layers (``mlp_only_layers`` / ``decoder_sparse_step``) as in Qwen3-MoE.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.common import BuildArgs, DecoderAttention, DenseMLP, MoEForCausalLM, SparseMoeBlock
from vllm.model_executor.models.utils import head_dim_of


class Qwen2MoeForCausalLM(MoEForCausalLM):
    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        return DecoderAttention(hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf),
                                rotary_emb=rope, args=args, qkv_bias=bool(getattr(hf, "qkv_bias", True)),
                                o_bias=False, prefix=prefix)

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        if not self._sparse_layer(hf, layer_idx):
            return DenseMLP(hf.hidden_size, hf.intermediate_size, args, prefix=prefix)
        return SparseMoeBlock(hf.hidden_size, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size,
                              renormalize=bool(hf.norm_topk_prob), args=args,
                              shared_intermediate_size=hf.shared_expert_intermediate_size, prefix=prefix)
