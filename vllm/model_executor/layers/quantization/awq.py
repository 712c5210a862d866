"""AWQ checkpoints (``quant_method: "awq"``, ``version: "gemm"``), as AutoAWQ writes them, 4-bit.

Per linear module (W = weight [out, in], G = in / group_size):

    qweight  int32 [in, out/8]   word [i, j] holds q[8j + AWQ_ORDER[k], i] as code k
    qzeros   int32 [G, out/8]    word [g, j] holds zero[g, 8j + AWQ_ORDER[k]] as code k (no offset)
    scales   fp16  [G, out]

    w[o, i] = scales[i // group_size, o] * (q[o, i] - zero[i // group_size, o])

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].  ``modules_to_not_convert`` entries are matched as
substrings of the module name (AutoAWQ's and vLLM's rule); those modules stay in their float dtype.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.layers.quantization.int4_config import Int4QuantizationConfig, Int4Scheme
from vllm.model_executor.layers.quantization.int4_packing import (check_group_size, check_packed_shape,
                                                                 unpack_int4_awq)

_REQUIRED = frozenset({"qweight", "qzeros", "scales"})


class AWQConfig(Int4QuantizationConfig):
    name = "awq"
    format_name = "AWQ"
    tensor_suffixes = _REQUIRED

    def __init__(self, group_size: int, modules_to_not_convert: Optional[list[str]] = None) -> None:
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"AWQ checkpoint has bits={bits!r}: only 4-bit AWQ (bits: 4) is supported")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported: only 'gemm' (AutoAWQ's default "
                             "layout) is; re-export the checkpoint with version 'gemm'")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoint has zero_point: false: only AWQ with zero points (zero_point: true, "
                             "the 'gemm' layout AutoAWQ writes) is supported")
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"AWQ group_size {group_size} must be positive, or -1 (one group per row)")
        skip = config.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise ValueError(f"AWQ modules_to_not_convert must be a list of names, got {skip!r}")
        return cls(group_size, skip)

    def module_scheme(self, name: str) -> Optional[Int4Scheme]:
        if any(part in name for part in self.modules_to_not_convert):
            return None
        return Int4Scheme(group_size=self.group_size, has_zeros=True, act_order=False)

    def tensor_names(self, scheme: Int4Scheme) -> tuple[frozenset[str], frozenset[str]]:
        return _REQUIRED, frozenset()

    def decode(self, name: str, tensors: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        if qweight.dim() != 2 or scales.dim() != 2:
            raise ValueError(f"AWQ module {name!r}: qweight and scales must be 2-D, got "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        group_size = check_group_size("AWQ", name, in_features, scheme.group_size)
        groups = in_features // group_size
        check_packed_shape(name, scales, (groups, out_features), "scales")
        check_packed_shape(name, qzeros, (groups, out_features // 8), "qzeros")
        q = unpack_int4_awq(qweight).t().contiguous()  # [out, in]
        zeros = unpack_int4_awq(qzeros).t().contiguous()  # [out, G]
        return Int4Weight(q, scales.t().contiguous(), zeros, group_size)
