"""Qwen3-MoE (``Qwen3MoeForCausalLM``): RMSNorm on every q/k head, no shared expert.

Layers are sparse unless listed in ``mlp_only_layers`` or off ``decoder_sparse_step``
(those get a dense ``mlp.gate_up_proj`` / ``mlp.down_proj`` of ``intermediate_size``).
Routing: softmax over experts, top-k, renormalised when ``norm_topk_prob``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.common import BuildArgs, DecoderAttention, DenseMLP, MoEForCausalLM, SparseMoeBlock
from vllm.model_executor.models.utils import head_dim_of


class Qwen3MoeForCausalLM(MoEForCausalLM):
    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        bias = bool(getattr(hf, "attention_bias", False))
        return DecoderAttention(hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf),
                                rotary_emb=rope, args=args, qkv_bias=bias, o_bias=bias, qk_norm="per_head",
                                rms_norm_eps=hf.rms_norm_eps, prefix=prefix)

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        if not self._sparse_layer(hf, layer_idx):
            return DenseMLP(hf.hidden_size, hf.intermediate_size, args, prefix=prefix)
        return SparseMoeBlock(hf.hidden_size, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size,
                              renormalize=bool(hf.norm_topk_prob), args=args, prefix=prefix)
