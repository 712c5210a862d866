"""The attention's q/k epilogue in one launch: optional q/k RMSNorm, optional clip, rotary embedding.

    q, k = qk_norm_rope(q, k, positions, cos_cache, sin_cache, head_dim=..., norm=..., ...)

q: [T, num_q_heads * head_dim], k: [T, num_kv_heads * head_dim] (any row stride, unit column stride:
e.g. column slices of the fused qkv projection); returns new contiguous q and k.  Per row, in order:

* ``norm``: None; "per_head" (Qwen3: RMSNorm over each head's head_dim values, weights [head_dim]); or
  "full" (OLMoE: RMSNorm over the whole row, weights [num_heads * head_dim]);
* ``clip``: clamp to [-clip, clip] (OLMoE's clip_qkv);
* neox rotary embedding of the first ``rotary_dim`` values of every head at ``positions[t]``, with
  cos / sin from the float32 caches [max_position, rotary_dim // 2] (rounded to the activation dtype
  at use); the rest of each head passes through.

On a GPU the unfused torch version is ~25 kernels (norm casts and reductions, cos/sin gathers,
products, cat); the Triton kernel is one launch over grid (T, 2).

``kv_write`` (a ``KVCacheWrite``: the values, the paged cache and the step's slots): the rotated keys and
the values (clipped with ``clip``) are also stored into the cache, as the attention's KV write would store
them - in the same launch on the Triton path (grid (T, 3)), by ``write_kv`` after the torch path.

``lora_delta`` (a ``PendingDelta`` of the q/k/v projection, slices q, k, v) with ``v`` (the values, a column view
of the projection's output): the projection's LoRA delta is added here - to q and k before the norms, to v in
place - rounded once, as the LoRA layer would have added it (``pending_delta.py``); the query heads are then
split over programs of ``LORA_Q_HEADS`` heads (not with the "full" norm, which spans them all; where a program's B
rows would not fit ``pending_delta.MAX_DELTA_TILE``, the torch path adds the delta).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.model_executor.layers.ops.rms_norm import rms_norm_torch
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2

_NORMS = (None, "per_head", "full")


@dataclass(frozen=True)
class KVCacheWrite:
    """Where ``qk_norm_rope`` also stores this step's K/V: ``value`` [T, kv_heads * head_dim] (unit column
    stride), ``kv_cache`` [2, num_blocks, block_size, kv_heads, head_dim], ``slot_mapping`` [T] (-1: skip)."""

    value: torch.Tensor
    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One program holds all the heads of one token: [heads, head_dim] tiles up to this many elements.
_MAX_TILE = 1 << 15
# query heads of one program when a LoRA delta is added (its B rows: LORA_Q_HEADS x head_dim x rank)
LORA_Q_HEADS = 4


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Reference neox rotation.  x: [T, heads * head_dim] (or [T, heads, head_dim]); cos / sin:
    [T, rotary_dim // 2] float32, rounded to x.dtype here."""
    shape = x.shape
    x = x.reshape(shape[0], -1, head_dim)
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotary_dim < head_dim:
        parts.append(x[..., rotary_dim:])
    return torch.cat(parts, dim=-1).reshape(shape)


def _norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, norm: str, head_dim: int) -> torch.Tensor:
    if norm == "per_head":
        T = x.shape[0]
        return rms_norm_torch(x.reshape(T, -1, head_dim), weight, eps).reshape(x.shape)
    return rms_norm_torch(x, weight, eps)


def qk_norm_rope_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                       sin_cache: torch.Tensor, *, head_dim: int, rotary_dim: Optional[int] = None,
                       norm: Optional[str] = None, q_weight: Optional[torch.Tensor] = None,
                       k_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                       clip: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the unfused ops, in the order the model applies them."""
    rotary_dim = rotary_dim or head_dim
    if norm is not None:
        q = _norm_torch(q, q_weight, eps, norm, head_dim)
        k = _norm_torch(k, k_weight, eps, norm, head_dim)
    if clip is not None:
        q, k = q.clamp(-clip, clip), k.clamp(-clip, clip)
    pos = positions.long()
    cos, sin = cos_cache[pos], sin_cache[pos]
    return rope_torch(q, cos, sin, head_dim, rotary_dim), rope_torch(k, cos, sin, head_dim, rotary_dim)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, head_dim: int,
           rotary_dim: int, norm: Optional[str], q_weight: Optional[torch.Tensor],
           k_weight: Optional[torch.Tensor]) -> None:
    if norm not in _NORMS:
        raise ValueError(f"norm must be None, 'per_head' or 'full', got {norm!r}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[0] != k.shape[0] or q.shape[1] % head_dim or k.shape[1] % head_dim:
        raise ValueError(f"q and k must be [tokens, heads * {head_dim}] with the same tokens, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_cache.shape[-1] != rotary_dim // 2:
        raise ValueError(f"rotary_dim {rotary_dim} must be even, in 1..{head_dim}, and twice the cos/sin cache "
                         f"width {cos_cache.shape[-1]}")
    if norm is not None:
        want_q, want_k = (head_dim, head_dim) if norm == "per_head" else (q.shape[1], k.shape[1])
        if q_weight is None or k_weight is None or q_weight.shape != (want_q,) or k_weight.shape != (want_k,):
            raise ValueError(f"norm {norm!r} needs q / k weights of shapes ({want_q},) and ({want_k},), got "
                             f"{None if q_weight is None else tuple(q_weight.shape)} and "
                             f"{None if k_weight is None else tuple(k_weight.shape)}")


def _use_triton(q: torch.Tensor, k: torch.Tensor, head_dim: int, norm: Optional[str],
                weights: tuple[Optional[torch.Tensor], ...], use_triton: Optional[bool]) -> bool:
    if use_triton is None:
        use_triton = q.is_cuda
    if not use_triton:
        return False
    if not q.is_cuda and not triton_interpreting():
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")
    heads = max(q.shape[1], k.shape[1]) // head_dim
    return (q.dtype in _FLOAT_DTYPES and k.dtype == q.dtype and q.stride(1) == 1 and k.stride(1) == 1
            and next_power_of_2(heads) * next_power_of_2(head_dim) <= _MAX_TILE
            and all(w is None or (w.dtype == q.dtype and w.is_contiguous()) for w in weights))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor, *, head_dim: int, rotary_dim: Optional[int] = None,
                 norm: Optional[str] = None, q_weight: Optional[torch.Tensor] = None,
                 k_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, clip: Optional[float] = None,
                 use_triton: Optional[bool] = None, kv_write: Optional[KVCacheWrite] = None,
                 lora_delta: Optional[PendingDelta] = None,
                 v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring.  Positions must be < max_position (checked on CPU tensors only: on a
    GPU it would cost a host sync; the kernel clamps them so it never reads out of bounds)."""
    rotary_dim = rotary_dim or head_dim
    _check(q, k, positions, cos_cache, head_dim, rotary_dim, norm, q_weight, k_weight)
    if kv_write is not None:
        _check_kv_write(kv_write, k, head_dim)
    if lora_delta is not None:
        _check_lora(lora_delta, q, k, v, kv_write)
    max_pos = cos_cache.shape[0]
    if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= max_pos:
        raise ValueError(f"position {int(positions.max())} is beyond max_position {max_pos}")
    nq, nk = q.shape[1] // head_dim, k.shape[1] // head_dim
    lora_q_heads = nq if norm == "full" else min(nq, LORA_Q_HEADS)  # a q program's heads with lora_delta
    if not _use_triton(q, k, head_dim, norm, (q_weight, k_weight), use_triton) or (
            kv_write is not None and kv_write.value.stride(1) != 1) or (v is not None and v.stride(1) != 1) or (
            lora_delta is not None and not lora_delta.fits(max(lora_q_heads, nk) * head_dim)):
        if lora_delta is not None:
            q, k = lora_delta.add_torch(0, q), lora_delta.add_torch(1, k)
            v.copy_(lora_delta.add_torch(2, v))
        q, k = qk_norm_rope_torch(q, k, positions, cos_cache, sin_cache, head_dim=head_dim, rotary_dim=rotary_dim,
                                  norm=norm, q_weight=q_weight, k_weight=k_weight, eps=eps, clip=clip)
        if kv_write is not None:
            _write_kv_torch(kv_write, k, clip, head_dim)
        return q, k
    from vllm.model_executor.layers.ops._qk_norm_rope_kernel import _qk_norm_rope_kernel

    T = q.shape[0]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    if cos_cache.stride(-1) != 1 or sin_cache.stride() != cos_cache.stride():
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    half, pass_w = rotary_dim // 2, head_dim - rotary_dim
    nh_p = next_power_of_2(max(nq, nk))
    tile = nh_p * max(16, next_power_of_2(half))
    cache_args = {}
    if kv_write is not None:
        c = kv_write.kv_cache
        cache_args = dict(v_ptr=kv_write.value, cache_ptr=c, slot_ptr=kv_write.slot_mapping,
                          stride_v=kv_write.value.stride(0), CACHE_BLOCK=c.shape[2], stride_ckv=c.stride(0),
                          stride_cb=c.stride(1), stride_co=c.stride(2), stride_ch=c.stride(3), stride_cd=c.stride(4),
                          WRITE_KV=True)
    cache_args.update(n_tokens=T)
    parts = 3 if kv_write is not None else 2
    cache_args.update(q_heads=nq)  # one program for all query heads
    if lora_delta is not None:
        q_heads = lora_q_heads
        groups = -(-nq // q_heads)
        nh_p = next_power_of_2(max(q_heads, nk))
        parts = groups + 2
        cache_args.update(v_ptr=v, stride_v=v.stride(0), q_heads=q_heads, Q_GROUPS=groups,
                          **lora_delta.delta_kernel_args())
    _qk_norm_rope_kernel[(T, parts)](
        q, k, q_out, k_out, positions, cos_cache, sin_cache,
        q_weight if q_weight is not None else q, k_weight if k_weight is not None else k,
        nq, nk, head_dim, half, max_pos, float(eps), float(clip or 0.0),
        q.stride(0), k.stride(0), q_out.stride(0), k_out.stride(0), cos_cache.stride(0),
        NORM=_NORMS.index(norm), CLIP=clip is not None, HAS_PASS=pass_w > 0,
        NH_P=nh_p, HALF_P=max(1, next_power_of_2(half)), PASS_P=max(1, next_power_of_2(pass_w)),
        num_warps=4 if tile <= 2048 else 8, **pdl_launch_kwargs(q.device), **cache_args,
    )
    return q_out, k_out


def _check_lora(delta: PendingDelta, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
                kv_write: Optional[KVCacheWrite]) -> None:
    if v is None or v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"lora_delta needs the values v shaped like k {tuple(k.shape)}, got "
                         f"{None if v is None else tuple(v.shape)}")
    if kv_write is not None and kv_write.value is not v:
        raise ValueError("with lora_delta and kv_write, kv_write.value must be v itself")
    if delta.slice_sizes != (q.shape[1], k.shape[1], v.shape[1]):
        raise ValueError(f"lora_delta of slices {delta.slice_sizes} for q / k / v of {q.shape[1]} / {k.shape[1]} / "
                         f"{v.shape[1]} columns")
    delta.check(q.shape[0], q.device)


def _check_kv_write(w: KVCacheWrite, k: torch.Tensor, head_dim: int) -> None:
    c = w.kv_cache
    kv_heads = k.shape[1] // head_dim
    if c.dim() != 5 or c.shape[0] != 2 or tuple(c.shape[3:]) != (kv_heads, head_dim):
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, {kv_heads}, {head_dim}], got {tuple(c.shape)}")
    if w.value.shape != k.shape or w.value.dtype != k.dtype or w.slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"value {tuple(w.value.shape)} {w.value.dtype} must match k {tuple(k.shape)} {k.dtype}, "
                         f"slot_mapping [{k.shape[0]}] (got {tuple(w.slot_mapping.shape)})")
    if len({t.device for t in (w.value, c, w.slot_mapping, k)}) != 1:
        raise ValueError("value, kv_cache, slot_mapping and k must be on one device")


def _write_kv_torch(w: KVCacheWrite, k: torch.Tensor, clip: Optional[float], head_dim: int) -> None:
    from vllm.attention.torch_backend import write_kv

    v = w.value if clip is None else w.value.clamp(-clip, clip)
    T = k.shape[0]
    write_kv(w.kv_cache, k.reshape(T, -1, head_dim), v.reshape(T, -1, head_dim), w.slot_mapping)
