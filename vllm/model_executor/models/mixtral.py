"""Mixtral (``MixtralForCausalLM``): plain attention, every layer sparse, routing always renormalised.

The MoE block keeps the checkpoint's name ``block_sparse_moe`` (router
``block_sparse_moe.gate``, experts ``block_sparse_moe.experts.{e}.w1`` gate /
``w3`` up / ``w2`` down).  transformers 5 names the same block ``mlp`` in memory
(``mlp.gate.weight``, fused ``mlp.experts.gate_up_proj`` / ``down_proj``), and
adapters trained on it use those names: ``HF_MODULE_ALIASES`` maps them here.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.common import BuildArgs, DecoderAttention, MoEForCausalLM, SparseMoeBlock
from vllm.model_executor.models.utils import head_dim_of


class MixtralForCausalLM(MoEForCausalLM):
    mlp_name = "block_sparse_moe"
    # transformers-5 in-memory module path -> ours (checkpoint keys and adapter keys)
    HF_MODULE_ALIASES = {".mlp.gate.": ".block_sparse_moe.gate.", ".mlp.experts": ".block_sparse_moe.experts"}

    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        return DecoderAttention(hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf),
                                rotary_emb=rope, args=args, prefix=prefix)

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        return SparseMoeBlock(hf.hidden_size, hf.num_local_experts, hf.num_experts_per_tok, hf.intermediate_size,
                              renormalize=True, args=args, prefix=prefix)

    @classmethod
    def map_hf_module_name(cls, name: str) -> str:
        """``model.layers.0.mlp.experts...`` -> ``model.layers.0.block_sparse_moe.experts...`` (others unchanged)."""
        for old, new in cls.HF_MODULE_ALIASES.items():
            if old in name:
                return name.replace(old, new, 1)
        return name

    def map_checkpoint_name(self, name: str) -> Optional[str]:
        mapped = super().map_checkpoint_name(name)
        return None if mapped is None else self.map_hf_module_name(mapped)
