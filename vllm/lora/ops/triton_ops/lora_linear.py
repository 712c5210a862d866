"""Public launcher of the dense (multi-)LoRA op: shrink and expand fused, added into y in place.

Per token t whose slot = token_lora_mapping[t] is in [0, L) (and enabled), per slice s::

    y[t, off_s + j] += sum_r (sum_k x[t, k] * A_s[slot, r, k]) * B_s[slot, j, r]

The inner sum (the shrink) is accumulated in fp32 and stays fp32 until it has
been multiplied by B; y is read, added to in fp32 and rounded once.

Shapes (L = max_loras slots, R = max rank, smaller adapters zero-padded):
    y: [T, cols] any strides;  x: [T, K] fp32/fp16/bf16, any strides
    lora_a_stacked: S tensors [L, R, K] (x's dtype);  lora_b_stacked: S tensors [L, N_s, R] (same dtype)
    token_lora_mapping: [>= T] int32 slot per token, -1 = no adapter
    adapter_enabled: optional [>= L] int32, 0 = slot skipped
    output_offsets: first column of each slice in y (default: 0, N_0, N_0 + N_1, ...)

Paths: up to ``SMALL_BATCH_TOKENS`` tokens (and above, while the per-token
L2 reads stay small: ``_TOKEN_PATH_MAX_WORK``), one program per (token, slice,
N-split) with no grouping: ``token_kernel`` 1 = two dependent memory round trips,
``token_variant_config``, or 2 = a split-K shrink and an expand,
``split_variant_config``, picked by shape (``auto_token_kernel``; the H200 A/B at
``TOKEN_KERNEL``); 0 = the first token kernel, kept for comparison.  Above,
tokens grouped by slot (``LoRALinearMetadata``,
made once per step by the Punica wrapper, or here when not given) and one
program per (slot block of BLOCK_M tokens, slice, N-split) on tensor cores; or, with
``sorted_split`` (``lora_linear_sorted_split.py``, at decode batches of 17-512 tokens), a
split-K shrink and an expand over those blocks.
Slices that are views of one buffer with one stride (the LoRA layers allocate
them so) run in one launch when S <= 3; otherwise one launch per slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from vllm.kernel_configs.tile_config import LoRALinearTileConfig
from vllm.lora.ops.slices import slice_offsets
from vllm.lora.ops.triton_ops import lora_linear_sorted_split as sorted_split
from vllm.lora.ops.triton_ops.lora_linear_sorted_split import launch_sorted_split
from vllm.lora.ops.triton_ops.moe_lora_config import rank_block
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2, triton_interpreting

SMALL_BATCH_TOKENS = 16
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_PROGRAMS = 264  # about two per SM on an H100/H200
_TOKEN_TARGET_PROGRAMS = 528  # token path: latency-bound, so more (cheap) programs in flight
_TOKEN_BLOCK_K_ELEMS = 8192  # token path: BLOCK_R * BLOCK_K fp32 partial products per program
# token path's kernel: 0 = lora_linear_token_kernel; 1 = the prefetch variant; 2 = split-K; None = by shape
# (``auto_token_kernel``).  H200 A/B (benchmark_lora_linear.py --token-variant, qwen3 width, 1-8 tokens, us):
# rank 16 qkv 5.5-9.5 -> 3.3-5.3 prefetch, o 7.2-8.1 -> 4.5-5.1; rank 32 qkv 8.2-15.7 -> 4.8-6.0 prefetch,
# o 16.8-21.6 -> 5.6-6.3 split-K (prefetch 8.1-9.8: its A spans 4 K tiles there)
TOKEN_KERNEL: Optional[int] = None
_PREFETCH_MAX_K_TILES = 2  # more K tiles of A than this: the split-K pair beats the prefetch kernel
# the variants were timed at ranks 16, 32 and 64 (H200, --token-variant --rank 64, qwen3 width, us: split-K
# qkv 1 / 16 tokens 7.4 / 12.2 vs the first kernel 23.0 / 49.8 and the sorted path 13.0 / 15.4; o 6.7 / 8.4 vs
# 170 / 693 and 18.4 / 18.6; at rank 64 the prefetch kernel's A spans 4 K tiles, so split-K is chosen)
_VARIANT_MAX_RANK = 64
_PREFETCH_MAX_TOKENS = 32  # above: the split-K pair (H200, rank 16, 64 tokens: o 8.9 -> 7.9 us, qkv 11.9 -> 11.4)
# above SMALL_BATCH_TOKENS the token path's variants (not kernel 0) stay while T * R * S * (K + N), the A and B
# elements they read from L2 (once per token), is at most this; the sorted kernel costs 12-22 us at every size
# (latency).  H200 A/B, qwen3 width: variants win at 18.9M (qkv rank 16 x 64 tokens 11.4 vs 12.0 us, rank 32 x
# 32 tokens 9.7 vs 13.9; o rank 16 x 128 tokens, 12.6M, 11.2 vs 15.9), tie or lose from 25.2M (o rank 32 x 128
# tokens 16.7 vs 16.7; qkv rank 32 x 64 tokens, 37.7M, 22.7 vs 12.7)
_TOKEN_PATH_MAX_WORK = 20_000_000
_SPLIT_A_ELEMS_MANY = 16384  # split-K above SMALL_BATCH_TOKENS: fewer, longer K chunks (H200: 1.04-1.10x)
# prefetch variant: elements of A in one K tile (all of K at rank 16 up to K = 2048), 64 per thread.  sm_90
# static report (lora_linear_static_report.py): with 64 elements per thread per tile ptxas issues the loads
# of A together (2 dependent round trips at qkv and o widths); with 128 it interleaves them with the FMAs
_PREFETCH_A_ELEMS = 32768
_PREFETCH_A_PER_THREAD = 64
_SPLIT_A_ELEMS = 8192  # split-K variant: elements of A per shrink program (32 per thread at 8 warps)


@dataclass
class LoRALinearMetadata:
    """Tokens grouped by adapter slot, for the sorted path (one per step, shared by all layers).

    sorted_token_ids: [>= T] int32 token indices ordered by slot (stable); the
        tokens of slot l are entries [sum(slot_counts[:l]), + slot_counts[l]);
        tokens without an adapter come last and are never read.
    slot_counts: [L] int32 number of tokens of each slot.
    """

    sorted_token_ids: torch.Tensor
    slot_counts: torch.Tensor


def lora_linear_metadata(token_lora_mapping: torch.Tensor, max_loras: int,
                         out: Optional[LoRALinearMetadata] = None) -> LoRALinearMetadata:
    """Group the tokens of ``token_lora_mapping`` [T] by slot, with device ops only (no host sync).

    ``out`` (buffers of at least T and L entries) is filled in place and returned, so
    references to it (and CUDA graphs that read it) stay valid.
    """
    key = token_lora_mapping.long()
    key = torch.where((key < 0) | (key >= max_loras), torch.full_like(key, max_loras), key)
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(max_loras + 1, dtype=torch.int32, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    if out is None:
        return LoRALinearMetadata(order, counts[:max_loras])
    out.sorted_token_ids[: order.numel()].copy_(order)
    out.slot_counts.copy_(counts[:max_loras])
    return out


def lora_linear_config(num_tokens: int, K: int, N: int, R: int, num_slices: int,
                       dtype: torch.dtype) -> LoRALinearTileConfig:
    """Tiles for one launch (``add_lora_linear``'s ``config=`` takes this, changed by ``dataclasses.replace``)."""
    if sorted_split.SORTED_SPLIT and (sorted_split.SORTED_SPLIT_MIN_TOKENS <= num_tokens
                                      <= sorted_split.SORTED_SPLIT_MAX_TOKENS):
        return sorted_split.sorted_split_config(num_tokens, K, N, R, dtype)
    kernel = auto_token_kernel(num_tokens, K, R) if TOKEN_KERNEL is None else TOKEN_KERNEL
    token_path = num_tokens <= SMALL_BATCH_TOKENS or (
        kernel != 0 and num_tokens * R * num_slices * (K + N) <= _TOKEN_PATH_MAX_WORK)
    if token_path and kernel == 1:
        return token_variant_config(num_tokens, K, N, R, num_slices, dtype)
    if token_path and kernel == 2:
        return split_variant_config(num_tokens, K, N, R, num_slices, dtype)
    return kernel0_config(num_tokens, K, N, R, num_slices, dtype)


def auto_token_kernel(num_tokens: int, K: int, R: int) -> int:
    """The token path's kernel for T tokens and a shrink over K at rank R: the prefetch variant (1) up to
    ``_PREFETCH_MAX_TOKENS`` tokens while its slot's A takes at most ``_PREFETCH_MAX_K_TILES`` K tiles, else
    the split-K pair (2); above rank ``_VARIANT_MAX_RANK`` (not yet timed on a GPU) the first kernel (0)."""
    if R > _VARIANT_MAX_RANK:
        return 0
    block_k = _prefetch_block_k(K, R)
    return 1 if num_tokens <= _PREFETCH_MAX_TOKENS and -(-K // block_k) <= _PREFETCH_MAX_K_TILES else 2


def _prefetch_block_k(K: int, R: int) -> int:
    """The prefetch kernel's K tile: all of K, up to ``_PREFETCH_A_ELEMS`` elements of the slot's A."""
    return min(next_power_of_2(max(K, 16)), _PREFETCH_A_ELEMS // next_power_of_2(max(R, 8)))


def kernel0_config(num_tokens: int, K: int, N: int, R: int, num_slices: int, dtype: torch.dtype,
                   sorted_path: bool = False) -> LoRALinearTileConfig:
    """Tiles of the sorted path (``sorted_path`` forces it at any size), and of ``lora_linear_token_kernel``
    (``token_kernel=0``) on the token path."""
    token_path = num_tokens <= SMALL_BATCH_TOKENS and not sorted_path
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():  # ~5 ms per loop iteration per program: one K tile, one N tile
        return LoRALinearTileConfig(block_m=16 if num_tokens <= 64 else 32, block_n=min(n_cap, 512),
                                    block_k=min(k_cap, 512), num_stages=1, token_path=token_path)
    # BLOCK_M is always set: a caller may force the sorted path for a small batch through ``config=``
    block_m = 16 if num_tokens <= 128 else (32 if num_tokens <= 1024 else 64)
    if token_path:
        block_r = next_power_of_2(max(R, 8))
        block_n, block_k = min(64, n_cap), min(k_cap, max(16, _TOKEN_BLOCK_K_ELEMS // block_r))
        programs = num_tokens * num_slices
        tiles = -(-N // block_n)
        splits = max(1, min(tiles, _TOKEN_TARGET_PROGRAMS // max(programs, 1)))
        return LoRALinearTileConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_n_splits=splits,
                                    num_warps=4, num_stages=1, token_path=True)
    # H200 sweep (benchmark_lora_linear.py --sweep, qwen3 width, 64 and 256 tokens): 128 x 128 tiles and
    # up to 16 N-splits beat 64 x 64 and 8 splits by 12-23 %
    block_n, block_k = 128, min(128 if dtype != torch.float32 else 32, k_cap)
    block_n = min(block_n, n_cap)
    programs = -(-num_tokens // block_m) * num_slices
    tiles = -(-N // block_n)
    splits = max(1, min(16, tiles, _TARGET_PROGRAMS // max(programs, 1)))
    return LoRALinearTileConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_n_splits=splits, num_warps=4,
                                num_stages=3, token_path=token_path)


def token_variant_config(num_tokens: int, K: int, N: int, R: int, num_slices: int,
                         dtype: torch.dtype) -> LoRALinearTileConfig:
    """Tiles of the token path's prefetch kernel (``token_kernel=1``): one program per block_n columns
    of a slice, each loading its slot's whole A at once (one K tile up to ``_PREFETCH_A_ELEMS``), so
    block_n trades the L2 bytes of A (programs x R x K) against the programs in flight."""
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():
        return LoRALinearTileConfig(block_m=16, block_n=min(n_cap, 64), block_k=min(k_cap, 512), num_warps=4,
                                    num_stages=1, token_path=True, token_kernel=1)
    block_r = next_power_of_2(max(R, 8))
    block_k = _prefetch_block_k(K, R)
    block_n = min(n_cap, max(128, min(512, next_power_of_2(num_tokens * N // 32))))
    num_warps = max(4, min(16, block_r * block_k // (32 * _PREFETCH_A_PER_THREAD)))
    return LoRALinearTileConfig(block_m=16, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=1,
                                token_path=True, token_kernel=1)


def split_variant_config(num_tokens: int, K: int, N: int, R: int, num_slices: int,
                         dtype: torch.dtype) -> LoRALinearTileConfig:
    """Tiles of the token path's split-K pair of kernels (``token_kernel=2``): block_k is one shrink program's
    K chunk (``_SPLIT_A_ELEMS`` elements of A), block_n one expand program's columns."""
    n_cap, k_cap = next_power_of_2(max(N, 16)), next_power_of_2(max(K, 16))
    if triton_interpreting():
        return LoRALinearTileConfig(block_m=16, block_n=min(n_cap, 64), block_k=min(k_cap, 256), num_warps=4,
                                    num_stages=1, token_path=True, token_kernel=2)
    # sm_90 static report: 128 columns and 8 warps keep both kernels at two dependent round trips at
    # ranks 16 and 32, 1-8 tokens (4 warps or 256-512 columns: up to 6 for the expand)
    block_r = next_power_of_2(max(R, 8))
    a_elems = _SPLIT_A_ELEMS if num_tokens <= SMALL_BATCH_TOKENS else _SPLIT_A_ELEMS_MANY
    block_k = max(64, min(k_cap, a_elems // block_r))
    return LoRALinearTileConfig(block_m=16, block_n=min(n_cap, 128), block_k=block_k, num_warps=8, num_stages=1,
                                token_path=True, token_kernel=2)


def _scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The split-K partials' buffer: uninitialised (the shrink writes every entry the expand reads)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _launch_split(y, x, a, b, mapping, enabled, has_enabled: bool, cfg: LoRALinearTileConfig, ns: int,
                  n_args: list[int], off_args: list[int], stride_as: int, stride_bs: int, interp: bool) -> None:
    """The split-K token path: shrink partials into a scratch [T, ns, K_SPLITS, BLOCK_R] (fp32, written
    before it is read: no memset), then the expand that sums them into y."""
    from vllm.lora.ops.triton_ops import _lora_linear_split_kernels as split

    T, K = x.shape
    L, R = a.shape[:2]
    k_splits = -(-K // cfg.block_k)
    block_r = next_power_of_2(max(R, 8 if not interp else 16))
    part = _scratch((T, ns, k_splits, block_r), x.device)
    split.lora_linear_split_shrink_kernel[(T, ns, k_splits)](
        x, a, part, mapping, K, R, L, x.stride(0), x.stride(1), stride_as, *a.stride(), *part.stride()[:3],
        BLOCK_K=cfg.block_k, BLOCK_R=block_r, num_warps=cfg.num_warps, num_stages=1, **pdl_launch_kwargs(x.device))
    split.lora_linear_split_expand_kernel[(T, ns, -(-max(n_args) // cfg.block_n))](
        part, b, y, mapping, enabled, R, L, k_splits, *n_args, *off_args, *part.stride()[:3], stride_bs,
        *b.stride(), y.stride(0), y.stride(1), HAS_ENABLED=has_enabled, BLOCK_N=cfg.block_n, BLOCK_R=block_r,
        BLOCK_J=next_power_of_2(k_splits), num_warps=cfg.num_warps, num_stages=1, **pdl_launch_kwargs(part.device))


def _slice_stride(ts: Sequence[torch.Tensor]) -> Optional[int]:
    """Element distance between consecutive slices if one base pointer and one set of strides address all."""
    if len(ts) == 1:
        return 0
    t0 = ts[0]
    if any(t.stride() != t0.stride() or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr()
           for t in ts):
        return None
    diff = ts[1].data_ptr() - t0.data_ptr()
    if diff % t0.element_size() or any(ts[i + 1].data_ptr() - ts[i].data_ptr() != diff for i in range(len(ts) - 1)):
        return None
    return diff // t0.element_size()


def _check(y, x, a_list, b_list, mapping, adapter_enabled, offs) -> None:
    if not a_list or len(a_list) != len(b_list):
        raise ValueError(f"{len(a_list)} lora_a slices but {len(b_list)} lora_b slices (need >= 1 of each)")
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be [T, K] and [T, cols]")
    L, R, K = a_list[0].shape
    for s, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 3 or tuple(a.shape) != (L, R, K) or K != x.shape[1]:
            raise ValueError(f"lora_a[{s}] {tuple(a.shape)} must be [L, R, K] = [{L}, {R}, {x.shape[1]}]")
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != R:
            raise ValueError(f"lora_b[{s}] {tuple(b.shape)} must be [{L}, N, {R}]")
        if a.dtype != x.dtype or b.dtype != x.dtype or x.dtype not in _FLOATS:
            raise ValueError(f"x, lora_a[{s}], lora_b[{s}] must share one float dtype, got "
                             f"{x.dtype}, {a.dtype}, {b.dtype}")
        if a.device != x.device or b.device != x.device or y.device != x.device:
            raise ValueError("x, y and the LoRA weights must be on one device")
        if offs[s] < 0 or offs[s] + b.shape[1] > y.shape[1]:
            raise ValueError(f"slice {s} covers columns [{offs[s]}, {offs[s] + b.shape[1]}) but y has {y.shape[1]}")
    if mapping.dim() != 1 or mapping.shape[0] < x.shape[0] or mapping.dtype != torch.int32:
        raise ValueError(f"token_lora_mapping must be int32 [>= T={x.shape[0]}], got {mapping.dtype} "
                         f"{tuple(mapping.shape)}")
    if adapter_enabled is not None and (adapter_enabled.dim() != 1 or adapter_enabled.shape[0] < L):
        raise ValueError(f"adapter_enabled must be 1-D with >= max_loras={L} entries")


def _check_config(config: LoRALinearTileConfig) -> None:
    if not isinstance(config, LoRALinearTileConfig):
        raise TypeError(f"config must be a LoRALinearTileConfig (lora_linear_config, changed by dataclasses.replace, "
                        f"or LoRALinearTileConfig.from_json), got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(config, name)
        if v & (v - 1):
            raise ValueError(f"{name.upper()}={v}: Triton tiles must be powers of two")
    if config.token_kernel not in (0, 1, 2):
        raise ValueError(f"TOKEN_KERNEL={config.token_kernel}: 0 (lora_linear_token_kernel), 1 (the prefetch "
                         "variant) or 2 (the split-K variant)")
    if config.sorted_split and config.token_path:
        raise ValueError("SORTED_SPLIT is the sorted path's pair of kernels: token_path must be false")


def add_lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                    lora_b_stacked: Sequence[torch.Tensor], token_lora_mapping: torch.Tensor, *,
                    adapter_enabled: Optional[torch.Tensor] = None, output_offsets: Optional[Sequence[int]] = None,
                    meta: Optional[LoRALinearMetadata] = None,
                    config: Optional[LoRALinearTileConfig] = None) -> None:
    """y += the LoRA delta of every token, in place (see the module docstring).

    ``config``: the tiles and path of every launch (default ``lora_linear_config``'s)."""
    from vllm.lora.ops.triton_ops import _lora_linear_kernels as kern

    a_list, b_list = list(lora_a_stacked), list(lora_b_stacked)
    offs = slice_offsets([b.shape[1] for b in b_list], output_offsets)
    _check(y, x, a_list, b_list, token_lora_mapping, adapter_enabled, offs)
    T, K = x.shape
    L, R = a_list[0].shape[:2]
    if T == 0 or R == 0:
        return
    n_sizes = [b.shape[1] for b in b_list]
    S = len(a_list)
    stride_as, stride_bs = _slice_stride(a_list), _slice_stride(b_list)
    one_launch = S <= 3 and stride_as is not None and stride_bs is not None
    groups = [list(range(S))] if one_launch else [[s] for s in range(S)]
    cfg = config if config is not None else lora_linear_config(T, K, max(n_sizes), R, len(groups[0]), x.dtype)
    _check_config(cfg)
    interp = triton_interpreting()
    if not cfg.token_path and meta is None:
        meta = lora_linear_metadata(token_lora_mapping[:T], L)
    enabled = adapter_enabled if adapter_enabled is not None else token_lora_mapping
    for group in groups:
        s0, ns = group[0], len(group)
        a, b = a_list[s0], b_list[s0]
        pad = 3 - ns
        n_args = [n_sizes[s] for s in group] + [0] * pad
        off_args = [offs[s] for s in group] + [0] * pad
        tiles = -(-max(n_args) // cfg.block_n)
        splits = max(1, min(cfg.num_n_splits, tiles))
        strides = [x.stride(0), x.stride(1), stride_as if ns > 1 else 0, *a.stride(), stride_bs if ns > 1 else 0,
                   *b.stride(), y.stride(0), y.stride(1), splits]
        common = dict(HAS_ENABLED=adapter_enabled is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if cfg.sorted_split:
            launch_sorted_split(y, x, a, b, meta, enabled, adapter_enabled is not None, cfg, ns, n_args, off_args,
                                stride_as if ns > 1 else 0, stride_bs if ns > 1 else 0, _scratch)
        elif cfg.token_path and cfg.token_kernel == 2:
            _launch_split(y, x, a, b, token_lora_mapping, enabled, adapter_enabled is not None, cfg, ns, n_args,
                          off_args, stride_as if ns > 1 else 0, stride_bs if ns > 1 else 0, interp)
        elif cfg.token_path and cfg.token_kernel == 1:
            kern.lora_linear_token_prefetch_kernel[(T, ns, -(-max(n_args) // cfg.block_n))](
                x, a, b, y, token_lora_mapping, enabled, K, R, L, *n_args, *off_args, *strides[:-1],
                BLOCK_R=next_power_of_2(max(R, 8 if not interp else 16)), K_TILES=-(-K // cfg.block_k), **common,
                **pdl_launch_kwargs(x.device))
        elif cfg.token_path:
            block_r = next_power_of_2(max(R, 8 if not interp else 16))
            kern.lora_linear_token_kernel[(T, ns, splits)](
                x, a, b, y, token_lora_mapping, enabled, K, R, L, *n_args, *off_args, *strides,
                BLOCK_R=block_r, K_TILES=-(-K // cfg.block_k), **common, **pdl_launch_kwargs(x.device))
        else:
            block_m = cfg.block_m
            grid = (-(-T // block_m) + min(L, T), ns, splits)
            kern.lora_linear_sorted_kernel[grid](
                x, a, b, y, meta.sorted_token_ids, meta.slot_counts, enabled, T, K, R, L, *n_args, *off_args,
                *strides, UPCAST=interp, FP32_PRECISION="ieee" if interp else "tf32x3",
                EXPAND_MODE=1 if b.dtype == torch.bfloat16 else 0, BLOCK_M=block_m, BLOCK_R=rank_block(R),
                **common, **pdl_launch_kwargs(x.device))
