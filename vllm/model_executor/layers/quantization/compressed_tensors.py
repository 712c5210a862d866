"""compressed-tensors ``pack-quantized`` W4A16 checkpoints (llm-compressor), 4-bit int weights.

Per quantized linear module (W = weight [out, in], G = in / group_size):

    weight_packed      int32 [out, ceil(in/8)]  word [o, j] holds q[o, 8j + k] + 8 as code k
                                                (signed -8..7 stored offset-binary, along the input)
    weight_scale       [out, G], the model's dtype (G = 1 for the channel strategy)
    weight_shape       int64 [2] = [out, in]
    weight_zero_point  int32 [ceil(out/8), G]   asymmetric only: word [r, g] holds zp[8r + k, g] + 8
                                                as code k (packed along the OUTPUT dimension)
    weight_g_idx       int32 [in]               only checkpoints written with actorder "group"

    w[o, i] = weight_scale[o, g(i)] * (q[o, i] - zp[o, g(i)])      (zp = 0 when symmetric)

Stored codes are q + 8, so they are the ``Int4Weight`` codes as they are (symmetric zero 8).
Which modules: ``config_groups`` (each with ``targets`` and ``weights``) minus ``ignore``; a
target or ignore entry is a module name, ``re:<regex>`` (``re.match``), or the class ``Linear``.
compressed-tensors 0.20 no longer writes actorder "group" (nor g_idx); "weight" reorders
columns only during calibration, so its checkpoints are plain group layouts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm.model_executor.layers.quantization.int4 import Int4Weight
from vllm.model_executor.layers.quantization.int4_config import Int4QuantizationConfig, Int4Scheme
from vllm.model_executor.layers.quantization.int4_packing import check_group_size, check_packed_shape, unpack_int4

PACK_QUANTIZED = "pack-quantized"
_BASE = frozenset({"weight_packed", "weight_scale", "weight_shape"})
_CLASS_NAME = re.compile(r"^[A-Z]\w*$")


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    if target == "Linear":  # every module asked about here is a linear layer
        return True
    return target == name


def _check_targets(entries: Any, what: str) -> list[str]:
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(t, str) for t in entries):
        raise ValueError(f"compressed-tensors {what} must be a list of names, got {entries!r}")
    for t in entries:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ValueError(f"compressed-tensors {what} entry {t!r} is not a valid regex: {e}") from None
        elif _CLASS_NAME.match(t) and t != "Linear":
            raise ValueError(f"compressed-tensors {what} entry {t!r} names a module class: only 'Linear', module "
                             "names and 're:' regexes are supported")
    return entries


@dataclass(frozen=True)
class _Group:
    name: str
    targets: tuple[str, ...]
    scheme: Int4Scheme


def _parse_group(name: str, group: dict[str, Any], default_format: Optional[str]) -> _Group:
    where = f"compressed-tensors config group {name!r}"
    fmt = group.get("format") or default_format
    if fmt != PACK_QUANTIZED:
        raise ValueError(f"{where}: format {fmt!r} is not supported: only {PACK_QUANTIZED!r} (W4A16 int4, as "
                         "llm-compressor writes it) is")
    for act in ("input_activations", "output_activations"):
        if group.get(act):
            raise ValueError(f"{where} quantizes {act}: only weight-only quantization (W4A16) is supported")
    w = group.get("weights")
    if not w:
        raise ValueError(f"{where} has no 'weights' quantization")
    if w.get("num_bits") != 4:
        raise ValueError(f"{where}: num_bits={w.get('num_bits')!r}: only 4-bit int weights (num_bits: 4) of "
                         f"the {PACK_QUANTIZED!r} format are supported")
    if w.get("type", "int") != "int":
        raise ValueError(f"{where}: weight type {w.get('type')!r} is not supported: only 'int'")
    if w.get("dynamic"):
        raise ValueError(f"{where}: dynamic weight quantization is not supported")
    strategy = w.get("strategy")
    if strategy == "group":
        group_size = w.get("group_size")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"{where}: strategy 'group' needs a positive group_size, got {group_size!r}")
    elif strategy == "channel":
        group_size = -1
    else:
        raise ValueError(f"{where}: weight strategy {strategy!r} is not supported: only 'group' and 'channel'")
    actorder = w.get("actorder")
    if actorder not in (None, False, "weight", "group"):
        raise ValueError(f"{where}: actorder {actorder!r} is not supported: only null, 'weight' and 'group'")
    return _Group(name, tuple(_check_targets(group.get("targets"), f"group {name!r} targets")),
                  Int4Scheme(group_size=group_size, has_zeros=not w.get("symmetric", True),
                             act_order=actorder == "group"))


class CompressedTensorsConfig(Int4QuantizationConfig):
    name = "compressed-tensors"
    format_name = "compressed-tensors"
    tensor_suffixes = _BASE | {"weight_zero_point", "weight_g_idx"}

    def __init__(self, groups: list[_Group], ignore: list[str]) -> None:
        self.groups = groups
        self.ignore = ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CompressedTensorsConfig":
        status = config.get("quantization_status")
        if status is not None and status != "compressed":
            raise ValueError(f"compressed-tensors quantization_status {status!r} is not supported: only "
                             "'compressed' checkpoints (packed weights) are")
        for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms"),
                          ("kv_cache_scheme", "KV-cache quantization")):
            if config.get(key):
                raise ValueError(f"compressed-tensors checkpoint uses {what} ({key}): not supported; only "
                                 f"{PACK_QUANTIZED!r} W4A16 weights are")
        groups_cfg = config.get("config_groups") or {}
        if not isinstance(groups_cfg, dict) or not groups_cfg:
            raise ValueError("compressed-tensors checkpoint has no config_groups: nothing says which modules are "
                             "quantized")
        groups = [_parse_group(n, g, config.get("format")) for n, g in groups_cfg.items()]
        return cls(groups, _check_targets(config.get("ignore"), "ignore"))

    def module_scheme(self, name: str) -> Optional[Int4Scheme]:
        if any(_matches(name, t) for t in self.ignore):
            return None
        for group in self.groups:
            if any(_matches(name, t) for t in group.targets):
                return group.scheme
        return None

    def tensor_names(self, scheme: Int4Scheme) -> tuple[frozenset[str], frozenset[str]]:
        required = _BASE | ({"weight_zero_point"} if scheme.has_zeros else set())
        return (required | {"weight_g_idx"}, frozenset()) if scheme.act_order else (required, frozenset())

    def decode(self, name: str, tensors: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        shape = [int(s) for s in tensors["weight_shape"].reshape(-1).tolist()]
        if len(shape) != 2:
            raise ValueError(f"compressed-tensors module {name!r}: weight_shape {shape} is not [out, in]")
        out_features, in_features = shape
        group_size = check_group_size("compressed-tensors", name, in_features, scheme.group_size)
        groups = in_features // group_size
        check_packed_shape(name, packed, (out_features, (in_features + 7) // 8), "weight_packed")
        check_packed_shape(name, scale, (out_features, groups), "weight_scale")
        q = unpack_int4(packed)[:, :in_features].contiguous()
        zeros = None
        if scheme.has_zeros:
            zp = tensors["weight_zero_point"]
            check_packed_shape(name, zp, ((out_features + 7) // 8, groups), "weight_zero_point")
            zeros = unpack_int4(zp.t().contiguous())[:, :out_features].t().contiguous()
        g_idx = None
        if scheme.act_order:
            g_idx = tensors["weight_g_idx"].to(torch.int32)
            check_packed_shape(name, g_idx, (in_features,), "weight_g_idx")
            if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise ValueError(f"compressed-tensors module {name!r}: weight_g_idx values must lie in "
                                 f"[0, {groups})")
        return Int4Weight(q, scale.contiguous(), zeros, group_size, g_idx)
