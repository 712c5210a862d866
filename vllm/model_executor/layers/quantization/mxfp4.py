"""``quant_method: "mxfp4"`` (gpt-oss as released): MXFP4 experts, everything else in float.

``quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.
Only MoE experts are stored in MXFP4; ``modules_to_not_convert`` names modules kept in
float (gpt-oss lists attention, router, embeddings, LM head).  A module is excluded
when an entry matches consecutive dotted components of its prefix, ``*`` standing for any
text (``"self_attn"`` and ``"model.layers.*.self_attn"`` both match
``model.layers.0.self_attn.q_proj``; ``"model.layers.1.mlp.experts"`` does not match layer 11).
"""
from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Optional

from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

_KNOWN_KEYS = {"quant_method", "modules_to_not_convert"}


class Mxfp4Config(QuantizationConfig):
    name = "mxfp4"

    def __init__(self, modules_to_not_convert: Optional[list[str]] = None) -> None:
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Mxfp4Config":
        method = str(config.get("quant_method", "")).lower()
        if method != cls.name:
            raise ValueError(f"Mxfp4Config parses quant_method 'mxfp4', got {method!r}")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, (list, tuple)) or not all(isinstance(m, str) for m in skip):
            raise ValueError(f"quantization_config.modules_to_not_convert must be a list of module names, got {skip!r}")
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            from vllm.logger import init_logger

            init_logger(__name__).info("mxfp4 quantization_config: ignoring keys %s (they do not change how "
                                       "MXFP4 experts are stored)", unknown)
        return cls(list(skip))

    def is_quantized(self, prefix: str) -> bool:
        """False for modules listed in ``modules_to_not_convert``; only MoE experts are MXFP4 at all."""
        return not self._excluded(prefix)

    def _excluded(self, prefix: str) -> bool:
        parts = prefix.split(".")
        for entry in self.modules_to_not_convert:
            entry = entry.strip(".")
            if not entry:
                continue
            n = entry.count(".") + 1  # the entry's components, matched against consecutive components of the prefix
            if any(fnmatch.fnmatchcase(".".join(parts[i:i + n]), entry) for i in range(len(parts) - n + 1)):
                return True
        return False

    def get_moe_method(self, moe_config: "FusedMoEConfig", prefix: str) -> Optional["FusedMoEMethodBase"]:
        if self._excluded(prefix):
            return None
        from vllm.model_executor.layers.fused_moe.mxfp4_fused_moe_method import Mxfp4FusedMoEMethod

        return Mxfp4FusedMoEMethod(moe_config)
