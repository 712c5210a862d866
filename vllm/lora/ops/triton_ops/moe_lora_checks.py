"""Argument checks and stride helpers of the MoE LoRA launchers (``fused_moe_lora.py``): the slices of the
stacked A / B weights, the routing tensors, the output's layout, the tile config and the alignment; each
failure is a ``ValueError`` / ``TypeError`` that names the argument and what it must be."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from vllm.kernel_configs.tile_config import MoELoRATileConfig
from vllm.lora.ops.moe_lora_align import MoELoRAAlignment
from vllm.triton_utils import triton_interpreting

Stacked = Union[torch.Tensor, Sequence[torch.Tensor]]
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def slices(stacked: Stacked, name: str) -> list[torch.Tensor]:
    if isinstance(stacked, torch.Tensor):
        stacked = [stacked] if stacked.dim() == 4 else list(stacked.unbind(0))
    ts = list(stacked)
    if not ts:
        raise ValueError(f"{name}: no slices given")
    for s, t in enumerate(ts):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}[{s}] must be a 4-D tensor [L, E, ., .], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}[{s}] dtype {t.dtype} is not fp32/fp16/bf16")
        if t.shape[:2] != ts[0].shape[:2] or t.dtype != ts[0].dtype or t.device != ts[0].device:
            raise ValueError(f"{name}: slices differ in (L, E), dtype or device: {[(tuple(x.shape), x.dtype) for x in ts]}")
    return ts


def uniform_slice_stride(ts: list[torch.Tensor]) -> Optional[int]:
    """Element distance between consecutive slices if one base pointer addresses them all, else None."""
    if len(ts) == 1:
        return 0
    t0 = ts[0]
    if any(t.shape != t0.shape or t.stride() != t0.stride() for t in ts):
        return None
    if any(t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() for t in ts):
        return None
    diff = ts[1].data_ptr() - t0.data_ptr()
    if diff % t0.element_size() != 0:
        return None
    if any(ts[i + 1].data_ptr() - ts[i].data_ptr() != diff for i in range(len(ts) - 1)):
        return None
    return diff // t0.element_size()


def check_routing(topk_ids: torch.Tensor, token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor,
                   expert_map: Optional[torch.Tensor], L: int, E: int, device: torch.device) -> tuple[int, int]:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [M, top_k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    m, top_k = topk_ids.shape
    if token_lora_mapping.dim() != 1 or token_lora_mapping.shape[0] < m:
        raise ValueError(f"token_lora_mapping must be 1-D with >= M={m} entries, got {tuple(token_lora_mapping.shape)}")
    if adapter_enabled.shape != (L + 1,):
        raise ValueError(f"adapter_enabled must be [max_loras + 1] = [{L + 1}], got {tuple(adapter_enabled.shape)}")
    if expert_map is not None and expert_map.dim() != 1:
        raise ValueError(f"expert_map must be 1-D [E_global], got {tuple(expert_map.shape)}")
    for name, t in (("topk_ids", topk_ids), ("token_lora_mapping", token_lora_mapping),
                    ("adapter_enabled", adapter_enabled), ("expert_map", expert_map)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, the LoRA weights on {device}")
    return m, top_k


def out_strides(out: torch.Tensor, m: int, top_k: int) -> tuple[int, int, int]:
    """(stride per token, stride per k, stride per column) of ``out``."""
    if out.dim() == 2 and out.shape[0] == m * top_k:
        return top_k * out.stride(0), out.stride(0), out.stride(1)
    if out.dim() == 3 and tuple(out.shape[:2]) == (m, top_k):
        return out.stride(0), out.stride(1), out.stride(2)
    raise ValueError(f"out must be [M*top_k, cols] or [M, top_k, cols] with M={m}, top_k={top_k}; got {tuple(out.shape)}")


def strides(t: Optional[torch.Tensor], names: str) -> dict[str, int]:
    """``{name: t.stride(d)}`` for the dims of ``t`` in order, named by ``names``; all 0 without ``t``."""
    keys = names.split()
    if t is None:
        return dict.fromkeys(keys, 0)
    if t.dim() != len(keys):
        raise ValueError(f"expected a {len(keys)}-D tensor for strides {keys}, got {tuple(t.shape)}")
    return dict(zip(keys, t.stride()))


def check_config(config: Optional[MoELoRATileConfig]) -> None:
    if config is None:  # the heuristic's
        return
    if not isinstance(config, MoELoRATileConfig):
        raise TypeError(f"config must be a MoELoRATileConfig (get_moe_lora_config, or MoELoRATileConfig.from_json "
                        f"for a dict of BLOCK_SIZE_M, ...), got {type(config).__name__}")
    for name in ("block_size_n", "block_size_k"):
        v = getattr(config, name)
        if v & (v - 1):
            raise ValueError(f"{name.upper()}={v} must be a power of two (a Triton tile)")


def check_alignment(alignment: Optional[MoELoRAAlignment], numel: int, L: int, E: int,
                     device: torch.device) -> None:
    if alignment is None:
        return
    if (alignment.numel, alignment.max_loras, alignment.num_experts) != (numel, L, E):
        raise ValueError(
            f"alignment was made for numel={alignment.numel}, max_loras={alignment.max_loras}, "
            f"num_experts={alignment.num_experts}; this call has {numel}, {L}, {E}")
    bs = alignment.block_size
    if bs & (bs - 1) or bs < (1 if triton_interpreting() else 16):
        raise ValueError(f"alignment.block_size must be a power of two >= 16 for the sorted kernel, got {bs}")
    if alignment.sorted_token_ids.device != device:
        raise ValueError(f"alignment is on {alignment.sorted_token_ids.device}, the LoRA weights on {device}")


def check_x(x: torch.Tensor, a_slices: list[torch.Tensor], m: int, top_k: int, top_k_in: int) -> torch.Tensor:
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, K], got {tuple(x.shape)}")
    if top_k_in not in (1, top_k):
        raise ValueError(f"top_k_in must be top_k={top_k} (x per token) or 1 (x per pair), got {top_k_in}")
    rows = m * top_k // top_k_in
    a0 = a_slices[0]
    if x.shape[0] != rows or any(a.shape[3] != x.shape[1] for a in a_slices):
        raise ValueError(f"x {tuple(x.shape)} must be [{rows}, K] with K = lora_a's last dim {a0.shape[3]}")
    if x.dtype != a0.dtype or x.device != a0.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) and lora_a ({a0.dtype}, {a0.device}) must match")
    if len({a.shape[2] for a in a_slices}) != 1:
        raise ValueError("lora_a slices must share the rank R")
    return x


def check_b(b_slices: list[torch.Tensor], L: int, E: int, R: int, dtype: torch.dtype, cols: int, n_offset: int,
             slice_stride: Optional[int]) -> None:
    for s, b in enumerate(b_slices):
        if tuple(b.shape[:2]) != (L, E) or b.shape[3] != R or b.dtype != dtype:
            raise ValueError(f"lora_b[{s}] {tuple(b.shape)} {b.dtype} must be [{L}, {E}, N, {R}] {dtype}")
    n_sizes = [b.shape[2] for b in b_slices]
    ends = [n_offset + (s * slice_stride if slice_stride is not None else sum(n_sizes[:s])) + n
            for s, n in enumerate(n_sizes)]
    if n_offset < 0 or max(ends) > cols:
        raise ValueError(f"slices end at column {max(ends)} (n_offset={n_offset}, slice_stride={slice_stride}, "
                         f"N={n_sizes}) but out has {cols} columns")
