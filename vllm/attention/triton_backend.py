"""Paged attention with Triton: one kernel for prefill, decode and mixed batches.

Same semantics as ``torch_backend.paged_attention_torch`` (see
``metadata.py``): query row i of sequence b sits at position
``seq_len - query_len + i`` and attends causally to positions <= it, through
the sequence's block table; grouped-query heads (num_heads a multiple of
num_kv_heads).  The kernel design is described in ``_paged_attention_kernel``.

The grid is sized from host-side metadata (``query_lens_cpu``), so launching
never synchronises with the device.

Decode-only batches whose (sequence, kv head) grid would leave most of the GPU
idle split each context over ``DECODE_SPLITS`` programs and reduce the partial
softmaxes after (``_decode_split_kernel``): whether to split depends on the
padded batch size and the head counts only, and the ranges on the device-side
seq_len, so the split path is CUDA-graph safe.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from vllm.attention import _decode_split_kernel as split_kern
from vllm.attention import _paged_attention_kernel as kern
from vllm.attention.metadata import AttentionMetadata
from vllm.attention.torch_backend import check_attention_options
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# Split-context decode: a fixed number of context ranges per (sequence, kv head).
DECODE_SPLITS = 16


@functools.lru_cache(maxsize=None)
def _num_sms(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_num_splits(num_seqs: int, kv_heads: int, device: torch.device) -> int:
    """DECODE_SPLITS when one program per (sequence, kv head) fills less than the GPU's SMs, else 1.
    1 on the interpreter (tests ask for splits explicitly)."""
    if device.type != "cuda":
        return 1
    return DECODE_SPLITS if num_seqs * kv_heads < _num_sms(device.index) else 1


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.dtype not in _DTYPES:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} is not supported (use one of {_DTYPES})")


def attention_tile_config(max_query_len: int, group: int, head_dim: int, interpreting: bool) -> dict:
    """Tile sizes: BLOCK_Q query rows x GROUP_P heads (>= 16 rows for tl.dot), BLOCK_N context positions.

    Untuned heuristic: decode-only batches take the fewest query rows that make 16 dot rows; prefills
    take 64 (GPU) rows; big head dims take smaller context tiles to bound registers.
    """
    group_p = next_power_of_2(group)
    block_d = max(16, next_power_of_2(head_dim))
    target_m = 64 if not interpreting else 32
    q_needed = next_power_of_2(max(max_query_len, 1))
    block_q = max(1, min(max(target_m // group_p, 1), q_needed))
    block_q = max(block_q, -(-16 // group_p))  # BLOCK_M = block_q * group_p >= 16
    if interpreting:
        block_n = 32
    else:
        block_n = 64 if block_d <= 128 else 32
    num_warps = 4 if block_q * group_p * block_d <= 64 * 128 else 8
    return dict(BLOCK_Q=block_q, GROUP_P=group_p, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)


def paged_attention_triton(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                           scale: float, out: Optional[torch.Tensor] = None, *,
                           num_splits: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
                           sliding_window: Optional[int] = None) -> torch.Tensor:
    """query: [T, num_heads, head_dim] -> output [T, num_heads, head_dim] in query.dtype.

    ``sinks``: [num_heads] logits joining each head's softmax denominator; ``sliding_window``: None
    (full causal) or W >= 1 (a query sees its last W positions); as in ``paged_attention_torch``.

    ``out`` (optional, same shape/dtype/device as query, any strides) receives the result.
    ``num_splits``: context splits of a decode-only batch (None: ``decode_num_splits``; ignored
    unless every query_len is 1).
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    _check_cache(kv_cache)
    T, H, D = query.shape
    _, _, block_size, kv_heads, cache_d = kv_cache.shape
    if query.dtype not in _DTYPES:
        raise ValueError(f"query dtype {query.dtype} is not supported (use one of {_DTYPES})")
    if kv_cache.dtype != query.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must match query dtype {query.dtype}")
    if cache_d != D:
        raise ValueError(f"query head_dim {D} != kv_cache head_dim {cache_d}")
    if D > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} > {_MAX_HEAD_DIM} is not supported by the Triton backend")
    if H % kv_heads:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {kv_heads}")
    check_attention_options(H, sinks, sliding_window, query.device)
    if block_size != meta.block_size:
        raise ValueError(f"kv_cache block_size {block_size} != metadata block_size {meta.block_size}")
    if T != meta.num_tokens:
        raise ValueError(f"query has {T} tokens but the metadata describes {meta.num_tokens}")
    if query.device != kv_cache.device:
        raise ValueError(f"query on {query.device} but kv_cache on {kv_cache.device}")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(f"out must match query ({tuple(query.shape)}, {query.dtype}, {query.device}), "
                         f"got ({tuple(out.shape)}, {out.dtype}, {out.device})")
    B = meta.num_seqs
    if T == 0 or B == 0:
        return out
    group = H // kv_heads
    interp = triton_interpreting()
    opts = _Options(sinks, sliding_window, query)
    if meta.max_query_len == 1:
        splits = decode_num_splits(B, kv_heads, query.device) if num_splits is None else int(num_splits)
        if splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if splits > 1:
            _paged_decode_split(query, kv_cache, meta, scale, out, splits, interp, opts)
            return out
    cfg = attention_tile_config(meta.max_query_len, group, D, interp)
    grid = (B, -(-meta.max_query_len // cfg["BLOCK_Q"]), kv_heads)
    tables = meta.block_tables
    kern.paged_attention_kernel[grid](
        query, kv_cache, out, meta.query_start_loc, meta.seq_lens, tables, opts.sinks,
        float(scale) * math.log2(math.e),
        group, D, block_size, opts.window,
        *query.stride(), *(kv_cache.stride()), *out.stride(), tables.stride(0),
        BLOCK_Q=cfg["BLOCK_Q"], GROUP_P=cfg["GROUP_P"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        UPCAST=interp, USE_WINDOW=opts.use_window, USE_SINKS=opts.use_sinks,
        num_warps=cfg["num_warps"], num_stages=2, **pdl_launch_kwargs(query.device),
    )
    return out


class _Options:
    """Kernel arguments of the sinks / window options (a dummy pointer and 0 when unused)."""

    def __init__(self, sinks: Optional[torch.Tensor], window: Optional[int], query: torch.Tensor) -> None:
        self.use_sinks, self.use_window = sinks is not None, window is not None
        self.window = int(window or 0)
        # fp32, read once per head; the query stands in as the (never read) pointer when there are none
        self.sinks = sinks.float().contiguous() if sinks is not None else query


def _paged_decode_split(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        out: torch.Tensor, splits: int, interp: bool, opts: _Options) -> None:
    """Decode-only batch (query row b = sequence b): split-context partials, then their reduce."""
    B = meta.num_seqs
    _, H, D = query.shape
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    group = H // kv_heads
    block_d = max(16, next_power_of_2(D))
    block_n = 32 if interp or block_d > 128 else 64
    part_acc = torch.empty(B, H, splits, block_d, dtype=torch.float32, device=query.device)
    part_m = torch.empty(B, H, splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    tables = meta.block_tables
    split_kern.decode_split_kernel[(B, kv_heads, splits)](
        query, kv_cache, meta.query_start_loc, meta.seq_lens, tables, part_acc, part_m, part_l,
        float(scale) * math.log2(math.e), group, D, block_size, H, opts.window,
        *query.stride(), *kv_cache.stride(), tables.stride(0),
        NUM_SPLITS=splits, BLOCK_M=max(16, next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=interp, USE_WINDOW=opts.use_window, num_warps=4, num_stages=2, **pdl_launch_kwargs(query.device),
    )
    split_kern.decode_reduce_kernel[(B, H)](
        out, meta.query_start_loc, meta.seq_lens, part_acc, part_m, part_l, opts.sinks, D, H, opts.window,
        *out.stride(),
        NUM_SPLITS=splits, SPLITS_P=next_power_of_2(splits), BLOCK_N=block_n, BLOCK_D=block_d,
        USE_WINDOW=opts.use_window, USE_SINKS=opts.use_sinks, num_warps=1, **pdl_launch_kwargs(out.device),
    )


def write_kv_triton(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """key / value: [T, num_kv_heads, head_dim] into the cache at ``slot_mapping`` (slot -1 skipped).

    No device->host sync (unlike the torch version's boolean filter).
    """
    _check_cache(kv_cache)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [T, num_kv_heads, head_dim], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    T, kv_heads, D = key.shape
    if (kv_heads, D) != tuple(kv_cache.shape[3:]):
        raise ValueError(f"key rows [{kv_heads}, {D}] do not match the cache's [num_kv_heads, head_dim] "
                         f"{list(kv_cache.shape[3:])}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != T:
        raise ValueError(f"slot_mapping must be [{T}], got {tuple(slot_mapping.shape)}")
    if T == 0:
        return
    kern.write_kv_kernel[(T,)](
        key, value, kv_cache, slot_mapping, kv_heads, D, kv_cache.shape[2],
        *key.stride(), *value.stride(), *kv_cache.stride(),
        BLOCK_H=next_power_of_2(kv_heads), BLOCK_D=next_power_of_2(D), num_warps=1, **pdl_launch_kwargs(key.device),
    )
