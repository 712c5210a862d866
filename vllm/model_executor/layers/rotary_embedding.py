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

import math
from typing import Any, Optional

import torch
from torch import nn

from vllm.model_executor.layers.ops.qk_norm_rope import rope_torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


def _rope_type(rope_scaling: Optional[dict[str, Any]]) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 scaling_factor: float = 1.0, device: torch.device | str | None = None, *,
                 inv_freq: Optional[torch.Tensor] = None, attention_scaling: float = 1.0) -> None:
        """``inv_freq`` [rotary_dim // 2] replaces the plain frequencies (YaRN); ``attention_scaling``
        multiplies cos and sin (YaRN's mscale), in float32 before any cast, as transformers does."""
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and in 1..head_dim ({head_dim})")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        if inv_freq is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
            inv_freq = inv_freq / scaling_factor
        elif inv_freq.shape != (rotary_dim // 2,):
            raise ValueError(f"inv_freq must be [{rotary_dim // 2}], got {tuple(inv_freq.shape)}")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.int64).float(), inv_freq.float())
        # [max_position, rotary_dim // 2] each; not parameters, not saved
        self.register_buffer("cos_cache", (freqs.cos() * attention_scaling).to(device), persistent=False)
        self.register_buffer("sin_cache", (freqs.sin() * attention_scaling).to(device), persistent=False)

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

    Supported rope types: "default", "linear" (positions divided by ``factor``) and "yarn"
    (``yarn_frequencies``).
    """
    kind = _rope_type(rope_scaling)
    if kind == "default":
        factor = 1.0
    elif kind == "linear":
        factor = float(rope_scaling["factor"])
    elif kind == "yarn":
        inv_freq, mscale = yarn_frequencies(rotary_dim or head_dim, base, rope_scaling, max_position)
        return RotaryEmbedding(head_dim, rotary_dim or head_dim, max_position, base, device=device,
                               inv_freq=inv_freq, attention_scaling=mscale)
    else:
        raise NotImplementedError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RotaryEmbedding(head_dim, rotary_dim or head_dim, max_position, base, factor, device=device)


def yarn_frequencies(dim: int, base: float, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): per-frequency blend of the original and the ``factor``-interpolated
    frequencies, and the attention scaling applied to cos / sin.

    ``params`` (transformers' ``rope_parameters``): ``factor`` (None: max_position /
    original_max_position_embeddings), ``original_max_position_embeddings``, ``beta_fast`` (32) /
    ``beta_slow`` (1): the rotation counts bounding the blend ramp, ``truncate`` (True: ramp ends
    rounded outwards to whole dims), ``attention_factor`` (else 0.1 ln(factor) + 1, or the
    ``mscale`` / ``mscale_all_dim`` ratio when both are given).
    """
    original = params.get("original_max_position_embeddings")
    if not original:
        raise ValueError("yarn rope_parameters need original_max_position_embeddings")
    factor = params.get("factor") or max_position / original
    factor = float(factor)

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale_of(factor, m) / mscale_of(factor, m_all) if m and m_all else mscale_of(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits ``rotations`` times in the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp  # 1: keep the original frequency (fast dims), 0: interpolate (slow dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)
