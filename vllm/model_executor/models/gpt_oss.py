"""gpt-oss (``GptOssForCausalLM``), as transformers' modeling_gpt_oss defines it.

The common pre-norm MoE decoder (``common.py``) with:

- attention: q/k/v/o with biases; a learned sink logit per head (``self_attn.sinks``) that joins
  the softmax denominator; layers alternating ``sliding_attention`` (window ``sliding_window``)
  and ``full_attention`` as ``layer_types`` says; YaRN RoPE (``rope_parameters``);
- MoE block ``mlp``: ``router`` (linear with bias; top-k of the logits, then softmax over those
  k) and ``experts`` (FusedMoE with biases and the clamped SwiGLU ``swigluoai``: gate/up
  interleaved along the rows, alpha 1.702, limit 7.0).

Expert weights, as checkpoints store them (FACTS.md 3):

- plain: ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate/up interleaved along the last dim),
  ``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H], ``down_proj_bias`` [E, H] - transposed,
  loaded together through ``FusedMoE.load_fused_experts(transposed=True)``;
- MXFP4 (``*_blocks`` / ``*_scales`` and the biases): every expert tensor goes to the layer's quant
  method (``load_checkpoint_tensor(layer, suffix, tensor)``), which the checkpoint's
  ``quantization_config`` chose; without it the checkpoint is refused with the reason.

Adapters: peft ``target_parameters`` adapters on ``mlp.experts.gate_up_proj`` / ``down_proj`` go
through ``FusedMoE3DWithLoRA`` (rows in the interleaved order); attention adapters on q/k/v/o
(biases stay the base model's).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.config import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.common import BuildArgs, DecoderAttention, MoEForCausalLM
from vllm.model_executor.models.utils import head_dim_of, join_prefix

LAYER_TYPES = ("sliding_attention", "full_attention")
_PLAIN = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_MXFP4 = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
          "gate_up_proj_bias", "down_proj_bias")


class GptOssMoE(nn.Module):
    """``router`` [E, H] + bias -> top-k then softmax -> ``experts`` (FusedMoE, swigluoai, biases)."""

    def __init__(self, hf: Any, args: BuildArgs, prefix: str = "") -> None:
        super().__init__()
        E, H = hf.num_local_experts, hf.hidden_size
        self.router = ReplicatedLinear(H, E, bias=True, **args.linear, prefix=join_prefix(prefix, "router"))
        self.experts = FusedMoE(E, hf.num_experts_per_tok, H, hf.intermediate_size, params_dtype=args.dtype,
                                device=args.device, renormalize=False, topk_then_softmax=True,
                                activation="swigluoai", has_bias=True, lora_enabled=args.lora_enabled,
                                moe_backend=args.moe_backend, **args.moe, prefix=join_prefix(prefix, "experts"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.router(x))


class GptOssForCausalLM(MoEForCausalLM):
    # adapters name the fused experts by their parameters (peft target_parameters)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def check_config(self, hf: Any) -> None:
        layer_types = list(getattr(hf, "layer_types", None) or [])
        if len(layer_types) != hf.num_hidden_layers or set(layer_types) - set(LAYER_TYPES):
            raise NotImplementedError(f"gpt-oss: layer_types must give one of {LAYER_TYPES} per layer "
                                      f"({hf.num_hidden_layers}), got {layer_types}")
        if "sliding_attention" in layer_types and not (isinstance(hf.sliding_window, int) and hf.sliding_window > 0):
            raise ValueError(f"gpt-oss: sliding_attention layers need a positive sliding_window, "
                             f"got {hf.sliding_window!r}")
        alpha, limit = getattr(hf, "swiglu_alpha", SWIGLUOAI_ALPHA), getattr(hf, "swiglu_limit", SWIGLUOAI_LIMIT)
        if (alpha, limit) != (SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT):
            raise NotImplementedError(f"gpt-oss: swiglu_alpha {alpha} / swiglu_limit {limit} are not supported "
                                      f"(the experts' activation uses {SWIGLUOAI_ALPHA} / {SWIGLUOAI_LIMIT})")
        if not getattr(hf, "attention_bias", True):
            raise NotImplementedError("gpt-oss: attention_bias=False is not supported")

    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        layer_idx = int(prefix.rsplit("model.layers.", 1)[1].split(".", 1)[0])
        sliding = hf.layer_types[layer_idx] == "sliding_attention"
        return DecoderAttention(hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, head_dim_of(hf),
                                rotary_emb=rope, args=args, qkv_bias=True, o_bias=True,
                                sliding_window=hf.sliding_window if sliding else None, sinks=True, prefix=prefix)

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        return GptOssMoE(hf, args, prefix=prefix)

    # ---- loading ---------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert tensors are taken here (``_ExpertLoader``); everything else goes the common way."""
        experts = _ExpertLoader(self)
        loaded = super().load_weights(experts.filter(weights))
        return loaded | experts.finish()


class _ExpertLoader:
    """Collects each layer's ``mlp.experts.<suffix>`` keys: the four plain tensors are loaded together
    (transposed layout); quantized ones go one by one to the quant method."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # plain tensors of a layer, until all four
        self.seen: dict[str, set[str]] = {}  # quantized suffixes loaded per layer
        self.done: set[str] = set()  # parameter names fully loaded

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in weights:
            moe, dot, suffix = key.rpartition(".")
            if moe.endswith(".mlp.experts") and (suffix in _PLAIN or suffix in _MXFP4):
                self.take(key, moe, suffix, tensor)
            else:
                yield key, tensor

    def layer(self, moe: str, key: str) -> FusedMoE:
        try:
            layer = self.model.get_submodule(moe)
        except AttributeError:
            layer = None
        if not isinstance(layer, FusedMoE):
            raise ValueError(f"checkpoint key {key!r}: {moe!r} is not an experts layer of this model")
        return layer

    def take(self, key: str, moe: str, suffix: str, tensor: torch.Tensor) -> None:
        layer = self.layer(moe, key)
        method = getattr(layer.quant_method, "old_method", layer.quant_method)
        quantized_key = suffix.endswith(("_blocks", "_scales"))
        if hasattr(method, "load_checkpoint_tensor"):
            if suffix in ("gate_up_proj", "down_proj"):
                raise ValueError(f"checkpoint key {key!r}: plain expert weights, but the checkpoint's "
                                 f"quantization_config makes the experts quantized")
            method.load_checkpoint_tensor(layer, suffix, tensor)
            got = self.seen.setdefault(moe, set())
            got.add(suffix)
            if got >= set(_MXFP4):
                self.done |= {f"{moe}.{n}" for n, _ in layer.named_parameters()}
            return
        if quantized_key:
            raise ValueError(f"checkpoint key {key!r}: the experts are stored in MXFP4, but MXFP4 experts are not "
                             "available here (no quant method for them; is quantization_config "
                             "'mxfp4' in config.json?)")
        parts = self.pending.setdefault(moe, {})
        parts[suffix] = tensor
        if len(parts) < len(_PLAIN):
            return
        E, H, I = layer.global_num_experts, layer.hidden_size, layer.moe_config.intermediate_size
        want = {"gate_up_proj": (E, H, 2 * I), "gate_up_proj_bias": (E, 2 * I), "down_proj": (E, I, H),
                "down_proj_bias": (E, H)}
        for name, shape in want.items():
            if tuple(parts[name].shape) != shape:
                raise ValueError(f"checkpoint key {moe}.{name}: expected shape {shape} (E={E}, H={H}, I={I}), "
                                 f"got {tuple(parts[name].shape)}")
        layer.load_fused_experts(gate_up=parts["gate_up_proj"], down=parts["down_proj"],
                                 gate_up_bias=parts["gate_up_proj_bias"], down_bias=parts["down_proj_bias"],
                                 transposed=True)
        self.done |= {f"{moe}.{n}" for n, _ in layer.named_parameters()}
        del self.pending[moe]

    def finish(self) -> set[str]:
        for moe, parts in self.pending.items():
            raise ValueError(f"experts {moe!r}: the checkpoint has {sorted(parts)} but not "
                             f"{sorted(set(_PLAIN) - parts.keys())}")
        for moe, got in self.seen.items():
            if not got >= set(_MXFP4):
                raise ValueError(f"experts {moe!r}: the checkpoint has {sorted(got)} but not "
                                 f"{sorted(set(_MXFP4) - got)}")
        return self.done
