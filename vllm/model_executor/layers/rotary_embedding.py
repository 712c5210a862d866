"""Rotary position embedding (neox / rotate-half style, as Llama, Qwen, Mixtral, OLMoE use).

For a head vector x of ``head_dim`` values, the first ``rotary_dim`` are split
into halves x1, x2 and rotated by the angle ``position * inv_freq[i]``:

    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin

The remaining ``head_dim - rotary_dim`` values (partial rotary) pass through.
cos/sin are computed in float32 once for every position below ``max_position``
and cast to the query dtype at use, which matches transformers' rounding.
``forward`` is the torch path; the models apply the rotation (with their q/k
norms) through ``ops.qk_norm_rope``, one Triton launch on CUDA, over these caches.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from vllm.model_executor.layers.ops.qk_norm_rope import rope_torch

SUPPORTED_ROPE_TYPES = ("default", "linear")


def _rope_type(rope_scaling: Optional[dict[str, Any]]) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 scaling_factor: float = 1.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and in 1..head_dim ({head_dim})")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        inv_freq = inv_freq / scaling_factor
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq)
        # [max_position, rotary_dim // 2] each; not parameters, not saved
        self.register_buffer("cos_cache", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] ints < max_position; query/key: [T, n * head_dim] (or [T, n, head_dim]).

        The bound is checked on CPU only: on a GPU it would cost a host sync per layer.
        """
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.max_position:
            raise ValueError(f"position {int(positions.max())} is beyond max_position {self.max_position}")
        pos = positions.long()
        cos, sin = self.cos_cache[pos], self.sin_cache[pos]
        return (rope_torch(query, cos, sin, self.head_dim, self.rotary_dim),
                rope_torch(key, cos, sin, self.head_dim, self.rotary_dim))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position}, "
                f"base={self.base}")


def get_rope(head_dim: int, max_position: int, base: float, rope_scaling: Optional[dict[str, Any]] = None, *,
             rotary_dim: Optional[int] = None, device: torch.device | str | None = None) -> RotaryEmbedding:
    """The rotary embedding for ``rope_scaling`` (a transformers ``rope_parameters`` dict, or None).

    Supported rope types: "default" and "linear" (positions divided by ``factor``).
    """
    kind = _rope_type(rope_scaling)
    if kind == "default":
        factor = 1.0
    elif kind == "linear":
        factor = float(rope_scaling["factor"])
    else:
        raise NotImplementedError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RotaryEmbedding(head_dim, rotary_dim or head_dim, max_position, base, factor, device=device)
