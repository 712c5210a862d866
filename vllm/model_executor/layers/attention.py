"""The ``Attention`` layer: stores this step's K/V in its paged cache and attends.

The KV cache tensor is bound once by the model runner (``bind_kv_cache``); the
per-step metadata comes from the forward context.  The backend (Triton kernel
or plain torch) is ``VLLM_ATTENTION_BACKEND`` if set (read once, at construction),
else chosen when the cache is bound: Triton for a cache on a CUDA device, torch
otherwise (so a model built on the CPU of a GPU machine runs on the CPU).

Options (gpt-oss): ``sliding_window`` W (a query sees its last W positions; None = full causal), fixed
per layer; ``sinks`` [num_heads], per-head logits joining the softmax denominator, passed to
``forward`` by the model that owns them (a parameter of its ``self_attn``, as checkpoints name it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vllm import envs
from vllm.attention.torch_backend import paged_attention_torch, write_kv
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.ops.qk_norm_rope import KVCacheWrite

# The Triton backend hands this step's KV write to the model's q/k norm + rotary launch (``kv_write_target``):
# one launch per layer fewer; off until benchmark_decode.py --fused-kv-write has timed it on a GPU.
FUSED_KV_WRITE = False


def select_attention_backend(device: torch.device | str | None = None) -> str:
    """"triton" or "torch": the env var if set, else Triton exactly when ``device`` (default: the
    platform's) is a CUDA device."""
    if envs.VLLM_ATTENTION_BACKEND:
        return envs.VLLM_ATTENTION_BACKEND
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "triton" if on_cuda else "torch"


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: Optional[int] = None,
                 prefix: str = "", sliding_window: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
        self.sliding_window = sliding_window
        self.prefix = prefix
        self.kv_cache: Optional[torch.Tensor] = None
        self.backend: Optional[str] = None  # None: decided by the cache's device in bind()
        if envs.VLLM_ATTENTION_BACKEND:
            self._use(envs.VLLM_ATTENTION_BACKEND)

    def _use(self, backend: str) -> None:
        self.backend = backend
        if backend == "triton":
            from vllm.attention.triton_backend import paged_attention_triton, write_kv_triton
            self._write_kv, self._attend = write_kv_triton, paged_attention_triton
        else:
            self._write_kv, self._attend = write_kv, paged_attention_torch

    def bind(self, kv_cache: torch.Tensor) -> None:
        """Attach this layer's paged cache; without an explicit backend, pick it by the cache's device."""
        self.kv_cache = kv_cache
        if self.backend is None:
            self._use(select_attention_backend(kv_cache.device))

    def kv_write_target(self, value: torch.Tensor) -> Optional[KVCacheWrite]:
        """Where a fused kernel (``qk_norm_rope``) may store this step's K/V itself - the Triton backend's
        cache and the step's slots, with ``value`` [T, num_kv_heads * head_dim] - or None: ``forward``
        writes them.  A caller that used it passes ``kv_written=True`` to ``forward``."""
        if not FUSED_KV_WRITE or self.backend != "triton" or self.kv_cache is None:
            return None
        return KVCacheWrite(value, self.kv_cache, get_forward_context().attn_metadata.slot_mapping)

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
                sinks: Optional[torch.Tensor] = None, *, kv_written: bool = False) -> torch.Tensor:
        """q: [T, num_heads * head_dim]; k, v: [T, num_kv_heads * head_dim] -> [T, num_heads * head_dim].

        ``sinks``: None, or [num_heads] logits joining each head's softmax denominator.
        ``kv_written``: this step's K/V are already in the cache (``kv_write_target``); k and v are unused.
        """
        if self.kv_cache is None:
            raise RuntimeError(f"attention layer {self.prefix or '<unnamed>'} has no KV cache bound; "
                               "call bind_kv_cache(model, caches) first")
        meta = get_forward_context().attn_metadata
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        if not kv_written:
            self._write_kv(self.kv_cache, k.view(T, self.num_kv_heads, self.head_dim),
                           v.view(T, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        if sinks is None and self.sliding_window is None:
            out = self._attend(q, self.kv_cache, meta, self.scale)
        else:
            out = self._attend(q, self.kv_cache, meta, self.scale, sinks=sinks, sliding_window=self.sliding_window)
        return out.reshape(T, self.num_heads * self.head_dim)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bind_kv_cache(model: nn.Module, caches: list[torch.Tensor]) -> None:
    """Give each Attention layer of ``model`` (in module order) its cache tensor."""
    layers = attention_layers(model)
    if len(layers) != len(caches):
        raise ValueError(f"model has {len(layers)} attention layers but {len(caches)} caches were given")
    for layer, cache in zip(layers, caches):
        layer.bind(cache)
