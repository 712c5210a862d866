"""GPTQ v1 checkpoints (``quant_method: "gptq"``, ``checkpoint_format: "gptq"``), 4-bit.

What AutoGPTQ, GPTQModel and Qwen's *-GPTQ-Int4 repositories store per linear module
(W = weight [out, in], G = in / group_size):

    qweight  int32 [in/8, out]   word [r, o] holds q[o, 8r + k] as code k (packed along the input)
    qzeros   int32 [G, out/8]    word [g, c] holds zero[g, 8c + k] - 1 as code k (v1's offset of one)
    scales   fp16  [G, out]
    g_idx    int32 [in]          the group of each input channel (a permutation of the groups with
                                 ``desc_act: true``; qweight stays in the original channel order)

    w[o, i] = scales[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])

v1 stores zero - 1, so a stored code 15 decodes as zero 16 (an asymmetric zero of 0 written by
v1).  ``dynamic`` (GPTQModel): ``"-:regex"`` keeps matching modules unquantized; ``"+:regex"``
(or a bare regex) overrides bits / group_size / desc_act / sym for them; the first key whose
regex ``re.match``-es the module name applies.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.layers.quantization.int4_config import Int4QuantizationConfig, Int4Scheme
from vllm.model_executor.layers.quantization.int4_packing import check_group_size, check_packed_shape, unpack_int4

_SUPPORTED_FORMATS = ("gptq",)
_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")


def _check_bits(bits: Any, where: str) -> None:
    if bits != 4:
        raise ValueError(f"GPTQ checkpoint{where} has bits={bits!r}: only 4-bit GPTQ (bits: 4) is supported")


class GPTQConfig(Int4QuantizationConfig):
    name = "gptq"
    format_name = "GPTQ"
    tensor_suffixes = frozenset({"qweight", "qzeros", "scales", "g_idx"})

    def __init__(self, group_size: int, desc_act: bool, sym: bool,
                 dynamic: Optional[dict[str, dict[str, Any]]] = None) -> None:
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.dynamic = dict(dynamic or {})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        _check_bits(config.get("bits", 4), "")
        fmt = config.get("checkpoint_format", config.get("format")) or "gptq"
        if str(fmt).lower() not in _SUPPORTED_FORMATS:
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported: only 'gptq' (v1, as AutoGPTQ, "
                             "GPTQModel's default export and Qwen's *-GPTQ-Int4 repositories write it) is; "
                             "convert the checkpoint to the v1 format")
        group_size = int(config.get("group_size", 128))
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"GPTQ group_size {group_size} must be positive, or -1 (one group per row)")
        dynamic = config.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"GPTQ 'dynamic' must be a mapping of regex -> overrides, got {type(dynamic).__name__}")
        for key, override in dynamic.items():
            try:
                re.compile(key[2:] if key[:2] in ("-:", "+:") else key)
            except re.error as e:
                raise ValueError(f"GPTQ 'dynamic' key {key!r} is not a valid regex: {e}") from None
            if not key.startswith("-:") and "bits" in (override or {}):
                _check_bits(override["bits"], f" (dynamic override {key!r})")
        return cls(group_size, bool(config.get("desc_act", False)), bool(config.get("sym", True)), dynamic)

    # ---- which modules, how --------------------------------------------------------------
    def _override(self, name: str) -> Optional[dict[str, Any]]:
        """None: excluded (``-:``); else the overrides of the first matching rule ({} if none matches)."""
        for key, override in self.dynamic.items():
            negative = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("-:", "+:") else key
            if re.match(pattern, name):
                return None if negative else {k: v for k, v in (override or {}).items() if k in _OVERRIDABLE}
        return {}

    def module_scheme(self, name: str) -> Optional[Int4Scheme]:
        override = self._override(name)
        if override is None:
            return None
        return Int4Scheme(group_size=int(override.get("group_size", self.group_size)),
                          has_zeros=not bool(override.get("sym", self.sym)),
                          act_order=bool(override.get("desc_act", self.desc_act)))

    def tensor_names(self, scheme: Int4Scheme) -> tuple[frozenset[str], frozenset[str]]:
        # g_idx is written by AutoGPTQ and GPTQModel; without act-order it carries nothing
        if scheme.act_order:
            return frozenset({"qweight", "qzeros", "scales", "g_idx"}), frozenset()
        return frozenset({"qweight", "qzeros", "scales"}), frozenset({"g_idx"})

    # ---- decoding -----------------------------------------------------------------------
    def decode(self, name: str, tensors: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        if qweight.dim() != 2 or scales.dim() != 2:
            raise ValueError(f"GPTQ module {name!r}: qweight and scales must be 2-D, got "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
        group_size = check_group_size("GPTQ", name, in_features, scheme.group_size)
        groups = in_features // group_size
        check_packed_shape(name, scales, (groups, out_features), "scales")
        check_packed_shape(name, qzeros, (groups, (out_features + 7) // 8), "qzeros")
        q = unpack_int4(qweight.t().contiguous())  # [out, in]
        zeros = (unpack_int4(qzeros)[:, :out_features].to(torch.int16) + 1).t().contiguous()  # v1: stored zero - 1
        g_idx = self._g_idx(name, tensors.get("g_idx"), in_features, group_size, scheme.act_order)
        if not scheme.has_zeros:
            if not bool((zeros == 8).all()):
                raise ValueError(f"GPTQ module {name!r}: sym is true but its qzeros are not all 8 (stored 7); the "
                                 "checkpoint's quantization_config disagrees with its weights")
            return Int4Weight(q, scales.t().contiguous(), None, group_size, g_idx)
        return Int4Weight(q, scales.t().contiguous(), zeros.to(torch.uint8), group_size, g_idx)

    @staticmethod
    def _g_idx(name: str, g_idx: Optional[torch.Tensor], in_features: int, group_size: int,
               act_order: bool) -> Optional[torch.Tensor]:
        if g_idx is None:
            return None
        check_packed_shape(name, g_idx, (in_features,), "g_idx")
        g_idx = g_idx.to(torch.int32)
        groups = in_features // group_size
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"GPTQ module {name!r}: g_idx values must lie in [0, {groups}), got "
                             f"[{int(g_idx.min())}, {int(g_idx.max())}]")
        plain = torch.arange(in_features, dtype=torch.int32) // group_size
        if torch.equal(g_idx, plain):
            return None
        if not act_order:
            raise ValueError(f"GPTQ module {name!r}: g_idx is permuted (act-order) but desc_act is false; "
                             "the checkpoint's quantization_config disagrees with its weights")
        return g_idx
