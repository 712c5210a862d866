"""Building blocks of the MoE decoder models (Qwen2-MoE, Qwen3-MoE, OLMoE, Mixtral).

All four are the same pre-norm decoder; a model file only says what differs
(q/k norm, biases, which layers are sparse, shared expert, checkpoint names):

    embed_tokens -> N x [ input_layernorm -> self_attn -> + residual
                          post_attention_layernorm -> mlp -> + residual ] -> norm

    self_attn:  qkv_proj -> (q_norm, k_norm) -> rope -> Attention (paged) -> o_proj
                (norms, clip and rope: one fused launch on CUDA, ops.qk_norm_rope)
    mlp:        SparseMoeBlock (gate: router, experts: FusedMoE [+ shared expert])
                or DenseMLP (gate_up_proj -> SiLU-and-mul -> down_proj)

Module names follow the HF checkpoints (``model.layers.{i}.self_attn.qkv_proj``,
``model.layers.{i}.mlp.experts``, ...), so adapter keys map onto them directly.
The residual add is fused into the next RMSNorm (``norm(x, residual)``, one launch on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.fused_moe.ops.activation import moe_activation
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.ops.pending_delta import PendingDelta, pending_for
from vllm.model_executor.layers.ops.qk_norm_rope import qk_norm_rope
from vllm.model_executor.layers.quantization.int4_config import Int4QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.int4_weights import decode_int4_weights
from vllm.model_executor.models.utils import (check_full_attention, check_silu, head_dim_of, hf_config_of,
                                              quant_config_of,
                                              join_prefix, load_checkpoint, rope_from_config)


@dataclass(frozen=True)
class BuildArgs:
    """What every layer constructor needs besides its shape.

    ``tp_group`` (None for one rank) is this process's tensor-parallel group
    (``vllm.distributed.TensorParallelGroup`` or anything with its two collectives).
    ``enable_expert_parallel``: the MoE layers split their experts over the same ranks
    (whole experts per rank) instead of splitting every expert's intermediate size.
    """

    dtype: torch.dtype
    device: torch.device
    lora_enabled: bool = False
    moe_backend: Optional[str] = None
    tp_group: Any = None
    enable_expert_parallel: bool = False
    quant_config: Any = None  # a QuantizationConfig, or None for a float checkpoint

    @property
    def tp_size(self) -> int:
        return 1 if self.tp_group is None else self.tp_group.world_size

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp_group is None else self.tp_group.rank

    @property
    def linear(self) -> dict[str, Any]:
        """Replicated layers (routers, the shared-expert gate)."""
        return {"params_dtype": self.dtype, "device": self.device}

    @property
    def column(self) -> dict[str, Any]:
        """Column-parallel layers: this rank's share of the outputs."""
        return {**self.linear, "tp_size": self.tp_size, "tp_rank": self.tp_rank}

    @property
    def moe(self) -> dict[str, Any]:
        """FusedMoE's parallel arguments: the intermediate size split over the TP ranks, or
        (expert parallelism) E / tp_size whole experts per rank, combined over the same group."""
        quant = {"quant_config": self.quant_config} if self.quant_config is not None else {}
        if self.enable_expert_parallel and self.tp_size > 1:
            return {"tp_size": 1, "tp_rank": 0, "ep_size": self.tp_size, "ep_rank": self.tp_rank,
                    "ep_group": self.tp_group, **quant}
        return {"tp_size": self.tp_size, "tp_rank": self.tp_rank, "tp_group": self.tp_group, **quant}

    @property
    def row(self) -> dict[str, Any]:
        """Row-parallel layers: this rank's share of the inputs, partial sums all-reduced."""
        return {**self.column, "tp_group": self.tp_group}


class DenseMLP(nn.Module):
    """SiLU-gated MLP: down_proj(silu(gate) * up), with gate and up fused in gate_up_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, args: BuildArgs, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, **args.column,
                                                       prefix=join_prefix(prefix, "gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, **args.row,
                                           prefix=join_prefix(prefix, "down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(gate) * up in one launch on CUDA (the MoE activation kernel), in fp32 rounded once
        return self.down_proj(moe_activation(MoEActivation.SILU, self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router ``gate`` [E, H] + ``experts`` (FusedMoE), optionally a sigmoid-gated shared expert (Qwen2-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, *,
                 renormalize: bool, args: BuildArgs, shared_intermediate_size: Optional[int] = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, num_experts, **args.linear, prefix=join_prefix(prefix, "gate"))
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, params_dtype=args.dtype,
                                device=args.device, renormalize=renormalize, activation="silu",
                                lora_enabled=args.lora_enabled, moe_backend=args.moe_backend, **args.moe,
                                prefix=join_prefix(prefix, "experts"))
        if shared_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, shared_intermediate_size, args,
                                          prefix=join_prefix(prefix, "shared_expert"))
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, **args.linear,
                                                       prefix=join_prefix(prefix, "shared_expert_gate"))
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class DecoderAttention(nn.Module):
    """Self-attention over the paged KV cache.

    qk_norm: None; "per_head" (Qwen3: RMSNorm over head_dim of every head); or
    "full" (OLMoE: RMSNorm over the whole projected q and k).  clip_qkv clamps
    q/k/v after the norms (OLMoE option).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rotary_emb: RotaryEmbedding, args: BuildArgs, qkv_bias: bool = False, o_bias: bool = False,
                 qk_norm: Optional[str] = None, rms_norm_eps: float = 1e-6, clip_qkv: Optional[float] = None,
                 sliding_window: Optional[int] = None, sinks: bool = False, prefix: str = "") -> None:
        super().__init__()
        if qk_norm not in (None, "per_head", "full"):
            raise ValueError(f"qk_norm must be None, 'per_head' or 'full', got {qk_norm!r}")
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias=qkv_bias,
                                          **args.column, prefix=join_prefix(prefix, "qkv_proj"))
        # this rank's heads (all of them without tensor parallelism)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim, self.tp_group = head_dim, args.tp_group
        self.kv_replicas = self.qkv_proj.num_kv_head_replicas  # ranks sharing each KV head (1 usually)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=o_bias, **args.row,
                                        prefix=join_prefix(prefix, "o_proj"))
        if qk_norm is not None:
            # "full" norms span every head of the model: under TP, q / k are gathered for it (_full_norm)
            q_dim, k_dim = (head_dim, head_dim) if qk_norm == "per_head" else (num_heads * head_dim,
                                                                               num_kv_heads * head_dim)
            self.q_norm = RMSNorm(q_dim, rms_norm_eps, params_dtype=args.dtype, device=args.device)
            self.k_norm = RMSNorm(k_dim, rms_norm_eps, params_dtype=args.dtype, device=args.device)
        self.rotary_emb = rotary_emb
        self.use_triton: Optional[bool] = None  # the fused q/k epilogue: None = Triton on CUDA (tests force it)
        self.attn = Attention(self.num_heads, head_dim, head_dim ** -0.5, self.num_kv_heads,
                              prefix=join_prefix(prefix, "attn"), sliding_window=sliding_window)
        self.sinks: Optional[nn.Parameter] = None
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=args.dtype, device=args.device),
                                      requires_grad=False)
            self.sinks.weight_loader = self._load_sinks

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """The checkpoint's [all heads] sinks -> this rank's heads (contiguous, as qkv_proj splits them)."""
        total = self.num_heads * (1 if self.tp_group is None else self.tp_group.world_size)
        if tuple(loaded.shape) != (total,):
            raise ValueError(f"sinks: expected shape ({total},) (one per attention head), got {tuple(loaded.shape)}")
        rank = 0 if self.tp_group is None else self.tp_group.rank
        param.data.copy_(loaded[rank * self.num_heads:(rank + 1) * self.num_heads])

    def _full_norm(self, norm: RMSNorm, x: torch.Tensor, replicas: int) -> torch.Tensor:
        """RMSNorm over all ranks' columns of ``x`` (this rank's share), returning this rank's share.

        ``replicas`` ranks hold the same KV heads when there are fewer KV heads than ranks.
        """
        if self.tp_group is None or self.tp_group.world_size == 1:
            return norm(x)
        width = x.shape[-1]
        parts = self.tp_group.all_gather(x, dim=-1).split(width, dim=-1)
        distinct = torch.cat(parts[::replicas], dim=-1)  # one copy of each head, in head order
        index = self.tp_group.rank // replicas
        return norm(distinct)[:, index * width:(index + 1) * width]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, *,
                qkv_lora: Optional[PendingDelta] = None, o_lora: Optional[PendingDelta] = None) -> torch.Tensor:
        """``qkv_lora`` / ``o_lora``: the projections' LoRA deltas handed on (``lora/layers/dense_handoff.py``):
        q/k norm + rotary adds the first, the caller's residual norm the second."""
        qkv = self.qkv_proj(hidden_states) if qkv_lora is None else self.qkv_proj(hidden_states,
                                                                                  pending_delta=qkv_lora)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        norm, clip = self.qk_norm, self.clip_qkv
        if norm == "full" and self.tp_group is not None and self.tp_group.world_size > 1:
            # the norm spans every rank's heads: gather, norm, keep this rank's share; then rotate
            q = self._full_norm(self.q_norm, q, 1)
            k = self._full_norm(self.k_norm, k, self.kv_replicas)
            norm = None
        rope = self.rotary_emb
        kv_write = self.attn.kv_write_target(v)  # the Triton backend's cache, when the launch may fill it
        # one launch on CUDA: q/k norm, clip, rotary (torch ops on CPU), and the KV write with kv_write
        q, k = qk_norm_rope(q, k, positions, rope.cos_cache, rope.sin_cache, head_dim=self.head_dim,
                            rotary_dim=rope.rotary_dim, norm=norm,
                            q_weight=self.q_norm.weight if norm else None,
                            k_weight=self.k_norm.weight if norm else None,
                            eps=self.q_norm.variance_epsilon if norm else 1e-6, clip=clip, use_triton=self.use_triton,
                            kv_write=kv_write, lora_delta=qkv_lora, v=v if qkv_lora is not None else None)
        if kv_write is not None:
            out = self.attn(q, None, None, sinks=self.sinks, kv_written=True)
        else:
            if clip is not None:
                v = v.clamp(-clip, clip)
            # v stays a column view of the qkv output: the KV-cache write reads it through its strides
            out = self.attn(q, k, v, sinks=self.sinks)
        return self.o_proj(out) if o_lora is None else self.o_proj(out, pending_delta=o_lora)


class DecoderLayer(nn.Module):
    """Pre-norm block; ``mlp_name`` is the HF attribute of the MLP ("mlp", or "block_sparse_moe" for Mixtral)."""

    def __init__(self, self_attn: DecoderAttention, mlp: nn.Module, hidden_size: int, rms_norm_eps: float,
                 args: BuildArgs, mlp_name: str = "mlp") -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps, params_dtype=args.dtype, device=args.device)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps, params_dtype=args.dtype,
                                                device=args.device)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = getattr(self, self.mlp_name)
        attn = self.self_attn
        # the projections' LoRA deltas, where they are handed to the norms and q/k norm + rotary (None: they add
        # their own; lora/layers/dense_handoff.py)
        qkv_lora, o_lora = pending_for(attn.qkv_proj, hidden_states), pending_for(attn.o_proj, hidden_states)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states, lora_shrink=qkv_lora)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual, lora_shrink=qkv_lora)
        hidden_states = attn(positions, hidden_states, qkv_lora=qkv_lora, o_lora=o_lora)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual, lora_delta=o_lora)
        return mlp(hidden_states), residual


class DecoderModel(nn.Module):
    """``model.*``: embed_tokens, layers, norm."""

    def __init__(self, hf: Any, layers: list[DecoderLayer], args: BuildArgs, prefix: str = "") -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(hf.vocab_size, hf.hidden_size, params_dtype=args.dtype,
                                                   device=args.device, tp_size=args.tp_size, tp_rank=args.tp_rank,
                                                   tp_group=args.tp_group, prefix=join_prefix(prefix, "embed_tokens"))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hf.hidden_size, hf.rms_norm_eps, params_dtype=args.dtype, device=args.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class MoEForCausalLM(nn.Module):
    """Base of the model classes.  A subclass defines ``make_attention`` and ``make_mlp``.

    Contract (what the engine and the LoRA manager use):
        __init__(config, *, dtype, device, lora_enabled=False, moe_backend=None, tp_group=None,
                 enable_expert_parallel=False, prefix="")
        forward(input_ids [T], positions [T]) -> hidden [T, H]   (inside set_forward_context)
        compute_logits(hidden [T, H]) -> [T, V] logits (the model dtype; float32 with a scale or soft cap)
        load_weights(iterable of (checkpoint name, tensor)) -> names of loaded parameters
    """

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    mlp_name = "mlp"

    def __init__(self, config: Any, *, dtype: Optional[torch.dtype] = None, device: torch.device | str | None = None,
                 lora_enabled: bool = False, moe_backend: Optional[str] = None, tp_group: Any = None,
                 enable_expert_parallel: bool = False, prefix: str = "") -> None:
        super().__init__()
        hf = hf_config_of(config)
        dtype = dtype or getattr(config, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype (or come from a ModelConfig), got {dtype!r}")
        self.check_config(hf)
        self.config = hf
        self.prefix = prefix
        args = BuildArgs(dtype, torch.device(device or "cpu"), lora_enabled, moe_backend, tp_group,
                         enable_expert_parallel, quant_config_of(config, hf))
        self.quant_config, self.params_dtype = args.quant_config, dtype
        rope = rope_from_config(hf, head_dim_of(hf), args.device)
        layers = []
        for i in range(hf.num_hidden_layers):
            p = join_prefix(prefix, f"model.layers.{i}")
            attn = self.make_attention(hf, rope, args, join_prefix(p, "self_attn"))
            mlp = self.make_mlp(hf, i, args, join_prefix(p, self.mlp_name))
            layers.append(DecoderLayer(attn, mlp, hf.hidden_size, hf.rms_norm_eps, args, self.mlp_name))
        self.model = DecoderModel(hf, layers, args, prefix=join_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(hf.vocab_size, hf.hidden_size, params_dtype=dtype, device=args.device,
                                      tp_size=args.tp_size, tp_rank=args.tp_rank, tp_group=args.tp_group,
                                      prefix=join_prefix(prefix, "lm_head"))
        self.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(hf.vocab_size)

    # ---- what a model file defines ------------------------------------------------
    def check_config(self, hf: Any) -> None:
        """Refuse what the model's layers cannot run (default: full attention and SiLU experts only)."""
        check_full_attention(hf)
        check_silu(hf)

    def make_attention(self, hf: Any, rope: RotaryEmbedding, args: BuildArgs, prefix: str) -> DecoderAttention:
        raise NotImplementedError

    def make_mlp(self, hf: Any, layer_idx: int, args: BuildArgs, prefix: str) -> nn.Module:
        raise NotImplementedError

    def map_checkpoint_name(self, name: str) -> Optional[str]:
        """A checkpoint key -> our parameter name (before stacking); None = skip the key."""
        if "rotary_emb." in name:
            return None  # inv_freq buffers of older checkpoints
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None  # the head shares embed_tokens' weight
        return name  # parameter names are relative to this module; ``prefix`` only labels the layers

    # ---- the contract ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if isinstance(self.quant_config, Int4QuantizationConfig):  # packed int4 tensors -> Int4Weight / float
            weights = decode_int4_weights(weights, self.quant_config, self.params_dtype)
        return load_checkpoint(self, weights, self.map_checkpoint_name)

    def _sparse_layer(self, hf: Any, layer_idx: int) -> bool:
        """Qwen-MoE rule: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step."""
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        return (layer_idx not in (getattr(hf, "mlp_only_layers", None) or [])
                and hf.num_experts > 0 and (layer_idx + 1) % step == 0)
