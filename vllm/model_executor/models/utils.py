"""Helpers shared by the model files: reading the HF config, and checkpoint loading.

Checkpoint names -> our parameters (``load_checkpoint``), in this order:

1. ``map_name`` (per model) renames or drops a key (None = skip: rotary
   ``inv_freq`` buffers, a tied ``lm_head``).
2. Per-expert keys ``<moe>.experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}.weight``
   go to ``FusedMoE.weight_loader`` as shard "w1" (gate) / "w3" (up) / "w2" (down).
3. Fused keys ``<moe>.experts.gate_up_proj`` [E, 2I, H] and ``<moe>.experts.down_proj``
   [E, H, I] (transformers 5's in-memory layout) are collected per layer and
   handed together to ``FusedMoE.load_fused_experts``.
4. Stacked projections: ``q_proj/k_proj/v_proj`` -> ``qkv_proj`` shards "q"/"k"/"v",
   ``gate_proj/up_proj`` -> ``gate_up_proj`` shards 0/1.
5. Anything else must name a parameter exactly; otherwise it is an error naming the key.

Int4 checkpoints are decoded first (``model_loader/int4_weights.py``): a per-expert key then
carries an ``Int4Weight``, handed to the layer's ``Int4MoEMethod.load_int4``; a float expert
weight for a quantized layer (or the reverse) is an error naming the key.

A parameter counts as loaded only when every piece of it arrived (all experts
and shards, all of q/k/v), so a checkpoint missing one expert is caught too.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, get_rope

STACKED_PARAMS = [  # (our packed module, checkpoint module, shard id)
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]
EXPERT_SHARDS = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
_PER_EXPERT = re.compile(r"^(?P<moe>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED = re.compile(r"^(?P<moe>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


# ---- config ------------------------------------------------------------------
def hf_config_of(config: Any) -> Any:
    """The transformers config, given a ``ModelConfig`` or the HF config itself."""
    return getattr(config, "hf_config", config)


def join_prefix(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def head_dim_of(hf: Any) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def check_full_attention(hf: Any) -> None:
    """Our attention is full causal attention: refuse configs that use a sliding window."""
    layer_types = getattr(hf, "layer_types", None) or []
    window = getattr(hf, "sliding_window", None)
    if "sliding_attention" in layer_types or (window and window < hf.max_position_embeddings):
        raise NotImplementedError(f"{type(hf).__name__}: sliding-window attention (window {window}) is not supported")


def check_silu(hf: Any) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{type(hf).__name__}: hidden_act {act!r} is not supported (only 'silu')")


def rope_from_config(hf: Any, head_dim: int, device: torch.device | str | None) -> RotaryEmbedding:
    """RoPE from ``rope_parameters`` (transformers 5) or the older ``rope_theta`` / ``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling = params or getattr(hf, "rope_scaling", None)
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    return get_rope(head_dim, hf.max_position_embeddings, base, scaling, rotary_dim=int(head_dim * partial),
                    device=device)


# ---- loading -----------------------------------------------------------------
def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


class _Coverage:
    """Which pieces of each parameter arrived; a parameter is loaded when all its pieces did."""

    def __init__(self) -> None:
        self.expected: dict[str, set] = {}
        self.seen: dict[str, set] = {}

    def add(self, name: str, piece: Any, expected: set) -> None:
        self.expected.setdefault(name, expected)
        self.seen.setdefault(name, set()).add(piece)

    def complete(self) -> set[str]:
        return {n for n, got in self.seen.items() if self.expected[n] <= got}


def _expected_stacked(module: nn.Module, shard_id: Any) -> set:
    return {"q", "k", "v"} if isinstance(shard_id, str) else set(range(len(module.output_sizes)))


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    map_name: Callable[[str], Optional[str]]) -> set[str]:
    """Load ``weights`` into ``model``; returns the names of fully loaded parameters.

    Every FusedMoE layer's ``process_weights_after_loading`` runs at the end.
    """
    params = dict(model.named_parameters())
    cover = _Coverage()
    int4_layers: dict[str, FusedMoE] = {}
    pending_fused: dict[str, dict[str, torch.Tensor]] = {}

    def param(our: str, key: str) -> nn.Parameter:
        if our not in params:
            shown = key if our == key else f"{key!r} (as {our!r})"
            raise ValueError(f"checkpoint key {shown} does not match any parameter of {type(model).__name__}")
        return params[our]

    def moe_layer(moe: str, key: str) -> FusedMoE:
        try:
            layer = model.get_submodule(moe)
        except AttributeError:
            layer = None
        if not isinstance(layer, FusedMoE):
            raise ValueError(f"checkpoint key {key!r}: {moe!r} is not a FusedMoE layer of {type(model).__name__}")
        return layer

    def load_one(key: str, name: str, tensor: Any) -> None:
        m = _PER_EXPERT.match(name)
        if m and m["proj"] in EXPERT_SHARDS:
            layer, e, shard = moe_layer(m["moe"], key), int(m["e"]), EXPERT_SHARDS[m["proj"]]
            if _load_int4_expert(layer, m["moe"], key, tensor, shard, e):
                cover.add(f"{m['moe']}.{_INT4_EXPERTS}", (e, shard),
                          {(i, s) for i in range(layer.global_num_experts) for s in ("w1", "w3", "w2")})
                int4_layers[m["moe"]] = layer
                return
            target = f"{m['moe']}.{'w2_weight' if shard == 'w2' else 'w13_weight'}"
            p = param(target, key)
            p.weight_loader(p, tensor, shard, e)
            shards = ("w2",) if shard == "w2" else ("w1", "w3")
            cover.add(target, (e, shard), {(i, s) for i in range(layer.global_num_experts) for s in shards})
            return
        m = _FUSED.match(name)
        if m:
            layer = moe_layer(m["moe"], key)
            parts = pending_fused.setdefault(m["moe"], {})
            parts[m["kind"]] = tensor
            if len(parts) == 2:
                layer.load_fused_experts(gate_up=parts["gate_up_proj"], down=parts["down_proj"])
                for target in ("w13_weight", "w2_weight"):
                    cover.add(f"{m['moe']}.{target}", "fused", {"fused"})
                del pending_fused[m["moe"]]
            return
        for packed, orig, shard_id in STACKED_PARAMS:
            if f".{orig}." in f".{name}":
                target = name.replace(f".{orig}.", f".{packed}.")
                p = param(target, key)
                p.weight_loader(p, tensor, shard_id)
                owner = model.get_submodule(target.rsplit(".", 1)[0])
                cover.add(target, shard_id, _expected_stacked(owner, shard_id))
                return
        p = param(name, key)
        loader = getattr(p, "weight_loader", None)
        loader(p, tensor) if loader is not None else default_weight_loader(p, tensor)
        cover.add(name, None, {None})

    for key, tensor in weights:
        name = map_name(key)
        if name is None:
            continue
        try:
            load_one(key, name, tensor)
        except ValueError as err:
            if key in str(err):
                raise
            raise ValueError(f"checkpoint key {key!r}: {err}") from err
    for moe, parts in pending_fused.items():
        missing = {"gate_up_proj", "down_proj"} - parts.keys()
        raise ValueError(f"fused experts {moe!r}: the checkpoint has {sorted(parts)} but not {sorted(missing)}")
    for module in model.modules():
        if isinstance(module, FusedMoE):
            module.process_weights_after_loading()
    loaded = cover.complete()
    for moe, layer in int4_layers.items():  # int4 experts: the quant method's own parameters, all or none
        if f"{moe}.{_INT4_EXPERTS}" in loaded:
            loaded.discard(f"{moe}.{_INT4_EXPERTS}")
            loaded |= {f"{moe}.{n}" for n, _ in layer.named_parameters()}
    return loaded


_INT4_EXPERTS = "<int4 experts>"  # the coverage entry of an int4 MoE layer's experts


def _load_int4_expert(layer: FusedMoE, moe: str, key: str, tensor: Any, shard: str, expert: int) -> bool:
    """Hand an int4 expert weight to the layer's int4 quant method; False: a float weight for a float layer."""
    load_int4 = getattr(layer.quant_method, "load_int4", None)
    if isinstance(tensor, Int4Weight):
        if load_int4 is None:
            raise ValueError(f"checkpoint key {key!r} is a quantized expert weight, but the experts of {moe!r} "
                             "are not quantized according to the checkpoint's quantization_config")
        load_int4(layer, shard, expert, tensor)
        return True
    if load_int4 is not None:
        raise ValueError(f"checkpoint key {key!r} is a float expert weight, but the checkpoint's "
                         f"quantization_config says the experts of {moe!r} are quantized")
    return False


def quant_config_of(config: Any, hf: Any) -> Any:
    """The checkpoint's ``QuantizationConfig`` (None: float): the one a ``ModelConfig`` resolved,
    else parsed from the HF config's ``quantization_config``."""
    if hasattr(config, "hf_config"):
        return getattr(config, "quant_config", None)
    from vllm.model_executor.layers.quantization import get_quantization_config

    return get_quantization_config(hf)
