"""What the three int4 formats (GPTQ, AWQ, compressed-tensors) share.

A format's config answers, for a checkpoint module name (``model.layers.0.self_attn.q_proj``):

- ``module_scheme(name)``: how the module is quantized (``Int4Scheme``), or None when it
  stays in its float dtype (excluded by ``dynamic``, ``modules_to_not_convert``, ``ignore``);
- ``tensor_names(scheme)``: the tensors the checkpoint stores for such a module;
- ``decode(name, tensors, scheme)``: those tensors -> ``Int4Weight``.

The MoE layers get ``Int4MoEMethod`` when their experts are quantized; the loader
(``model_loader/int4_weights.py``) uses the rest.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.int4 import Int4Weight

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

# per-expert module names under ``<moe>.experts.{e}``: Mixtral's, and everyone else's
_MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")
_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Int4Scheme:
    """How one module is quantized.  ``group_size`` -1: one group spans the whole input."""

    group_size: int
    has_zeros: bool
    act_order: bool


class Int4QuantizationConfig(QuantizationConfig):
    #: the format's name in messages ("GPTQ", "AWQ", "compressed-tensors")
    format_name: str = ""
    #: every tensor suffix a quantized module of this format can have (``qweight``, ...)
    tensor_suffixes: frozenset[str] = frozenset()

    @abstractmethod
    def module_scheme(self, name: str) -> Optional[Int4Scheme]:
        """The scheme of the checkpoint module ``name``; None: it is stored in its float dtype."""

    @abstractmethod
    def tensor_names(self, scheme: Int4Scheme) -> tuple[frozenset[str], frozenset[str]]:
        """(required, optional) tensor suffixes of a module quantized with ``scheme``."""

    @abstractmethod
    def decode(self, name: str, tensors: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
        """The module's stored tensors (by suffix) -> its weight, [out, in]."""

    def is_quantized(self, prefix: str) -> bool:
        return self.module_scheme(prefix) is not None

    def get_moe_method(self, moe_config: "FusedMoEConfig", prefix: str) -> Optional["FusedMoEMethodBase"]:
        """``Int4MoEMethod`` when every expert of the layer is quantized alike, None when none is."""
        names = _MIXTRAL_EXPERT_NAMES if ".block_sparse_moe." in f".{prefix}." else _EXPERT_NAMES
        schemes = {f"{prefix}.{e}.{n}": self.module_scheme(f"{prefix}.{e}.{n}")
                   for e in range(moe_config.num_experts) for n in names}
        distinct = set(schemes.values())
        if distinct == {None}:
            return None
        if len(distinct) > 1:
            quantized = sorted(k for k, s in schemes.items() if s is not None)
            plain = sorted(k for k, s in schemes.items() if s is None)
            detail = (f"e.g. {quantized[0]!r} is quantized but {plain[0]!r} is not" if plain
                      else "their group sizes, zero points or act-order differ")
            raise ValueError(f"{self.format_name} checkpoint: the experts of {prefix!r} are not all quantized "
                             f"the same way ({detail}); an MoE layer's experts must share one scheme")
        scheme = distinct.pop()
        assert scheme is not None
        from vllm.model_executor.layers.fused_moe.int4_fused_moe_method import Int4MoEMethod

        return Int4MoEMethod(moe_config, scheme.group_size, scheme.has_zeros, scheme.act_order)
