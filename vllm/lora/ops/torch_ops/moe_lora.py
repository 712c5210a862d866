"""MoE LoRA compute in plain PyTorch: the CPU implementation and the loop reference.

Same math and argument conventions as ``vllm.lora.ops.triton_ops.fused_moe_lora``
(read its module docstring for shapes): per pair p with an enabled adapter
slot and a local expert e::

    out[p, col(s) + j] += w_p * ((x[p // top_k_in] @ A_s[slot, e]^T) @ B_s[slot, e]^T)[j]

with the shrink result kept in fp32.

* ``fused_moe_lora_torch`` - grouped by virtual expert (slot, expert): one
  gather and two small matmuls per group present.  Used by the CPU Punica
  wrapper; ``alignment`` and ``config`` are accepted and ignored.
* ``moe_lora_shrink_torch`` / ``moe_lora_expand_torch`` - the two halves.
* ``moe_lora_reference`` - a per-pair Python loop in float64; what tests trust.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch

from vllm.lora.ops.moe_lora_align import lora_virtual_expert_ids
from vllm.lora.ops.slices import slice_offsets

Stacked = Union[torch.Tensor, Sequence[torch.Tensor]]

if TYPE_CHECKING:
    from vllm.kernel_configs.tile_config import MoELoRATileConfig


def _as_list(stacked: Stacked) -> list[torch.Tensor]:
    if isinstance(stacked, torch.Tensor):
        return [stacked] if stacked.dim() == 4 else list(stacked.unbind(0))
    return list(stacked)


def _columns(n_sizes: list[int], n_offset: int, slice_stride: Optional[int]) -> list[int]:
    """First output column of each slice: ``slice_stride`` apart when given, else packed."""
    widths = [slice_stride] * len(n_sizes) if slice_stride is not None else n_sizes
    return slice_offsets(widths, None, n_offset)


def _groups(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L: int, E: int
            ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(slot, local expert, int64 pair indices) for each virtual expert that has pairs."""
    vids = lora_virtual_expert_ids(topk_ids, token_lora_mapping, num_experts=E, max_loras=L,
                                   adapter_enabled=adapter_enabled, expert_map=expert_map)
    keep = torch.nonzero(vids >= 0).flatten()
    if keep.numel() == 0:
        return
    order = torch.sort(vids[keep], stable=True)
    uniq, counts = torch.unique_consecutive(order.values, return_counts=True)
    for v, idx in zip(uniq.tolist(), torch.split(keep[order.indices], counts.tolist())):
        yield v // E, v % E, idx


def _out_index(out: torch.Tensor, idx: torch.Tensor, top_k: int) -> tuple:
    return (idx,) if out.dim() == 2 else (idx // top_k, idx % top_k)


def moe_lora_shrink_torch(x: torch.Tensor, lora_a_stacked: Stacked, *, topk_ids: torch.Tensor,
                          token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor, top_k_in: int,
                          expert_map: Optional[torch.Tensor] = None, alignment: Any = None,
                          config: Optional["MoELoRATileConfig"] = None) -> torch.Tensor:
    """fp32 [S, M * top_k, R]; rows of pairs without LoRA are 0."""
    del alignment, config
    a_list = _as_list(lora_a_stacked)
    L, E, R = a_list[0].shape[:3]
    x = x.reshape(-1, x.shape[-1])
    shrunk = torch.zeros((len(a_list), topk_ids.numel(), R), dtype=torch.float32, device=x.device)
    for slot, e, idx in _groups(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E):
        xs = x[idx // top_k_in].float()
        for s, a in enumerate(a_list):
            shrunk[s, idx] = xs @ a[slot, e].float().T
    return shrunk


def moe_lora_expand_torch(out: torch.Tensor, shrunk_fp32: torch.Tensor, lora_b_stacked: Stacked, *,
                          topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor],
                          token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor,
                          mul_routed_weight: bool = False, expert_map: Optional[torch.Tensor] = None,
                          alignment: Any = None, n_offset: int = 0, slice_stride: Optional[int] = None,
                          config: Optional["MoELoRATileConfig"] = None) -> None:
    """out += (w_p *) shrunk_fp32[s, p] @ B_s[slot, e]^T, in place."""
    del alignment, config
    b_list = _as_list(lora_b_stacked)
    L, E = b_list[0].shape[:2]
    top_k = topk_ids.shape[1]
    cols = _columns([b.shape[2] for b in b_list], n_offset, slice_stride)
    w = topk_weights.reshape(-1).float() if mul_routed_weight else None
    for slot, e, idx in _groups(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E):
        where = _out_index(out, idx, top_k)
        for s, b in enumerate(b_list):
            d = shrunk_fp32[s, idx] @ b[slot, e].float().T
            if w is not None:
                d = d * w[idx, None]
            c = slice(cols[s], cols[s] + b.shape[2])
            out[(*where, c)] = (out[(*where, c)].float() + d).to(out.dtype)


def fused_moe_lora_torch(out: torch.Tensor, x: torch.Tensor, lora_a_stacked: Stacked, lora_b_stacked: Stacked, *,
                         topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor],
                         token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor, top_k_in: int,
                         mul_routed_weight: bool = False, expert_map: Optional[torch.Tensor] = None,
                         alignment: Any = None, n_offset: int = 0, slice_stride: Optional[int] = None,
                         config: Optional["MoELoRATileConfig"] = None, overwrite: bool = False) -> None:
    """out += LoRA delta, in place (``overwrite``: out = the delta); same semantics as the Triton
    ``fused_moe_lora``."""
    del alignment, config
    if overwrite:
        out.zero_()
    a_list, b_list = _as_list(lora_a_stacked), _as_list(lora_b_stacked)
    L, E = a_list[0].shape[:2]
    top_k = topk_ids.shape[1]
    x = x.reshape(-1, x.shape[-1])
    cols = _columns([b.shape[2] for b in b_list], n_offset, slice_stride)
    w = topk_weights.reshape(-1).float() if mul_routed_weight else None
    for slot, e, idx in _groups(topk_ids, token_lora_mapping, adapter_enabled, expert_map, L, E):
        xs = x[idx // top_k_in].float()
        where = _out_index(out, idx, top_k)
        for s, (a, b) in enumerate(zip(a_list, b_list)):
            d = (xs @ a[slot, e].float().T) @ b[slot, e].float().T  # fp32 intermediate
            if w is not None:
                d = d * w[idx, None]
            c = slice(cols[s], cols[s] + b.shape[2])
            out[(*where, c)] = (out[(*where, c)].float() + d).to(out.dtype)


def moe_lora_reference(x: torch.Tensor, lora_a_stacked: Stacked, lora_b_stacked: Stacked, *,
                       topk_ids: torch.Tensor, topk_weights: Optional[torch.Tensor],
                       token_lora_mapping: torch.Tensor, adapter_enabled: torch.Tensor, top_k_in: int,
                       out_cols: int, mul_routed_weight: bool = False, expert_map: Optional[torch.Tensor] = None,
                       n_offset: int = 0, slice_stride: Optional[int] = None) -> torch.Tensor:
    """The LoRA delta, fp32 [M * top_k, out_cols], by a per-pair loop in float64 on the CPU.

    Rows of pairs that get no delta (no adapter, disabled slot, non-local expert)
    and columns outside the slices are exactly 0.
    """
    a_list = [a.detach().double().cpu() for a in _as_list(lora_a_stacked)]
    b_list = [b.detach().double().cpu() for b in _as_list(lora_b_stacked)]
    L, E = a_list[0].shape[:2]
    x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
    m, top_k = topk_ids.shape
    ids = topk_ids.reshape(-1).tolist()
    slots = token_lora_mapping.tolist()
    enabled = adapter_enabled.tolist()
    emap = expert_map.tolist() if expert_map is not None else None
    weights = topk_weights.reshape(-1).double().cpu().tolist() if mul_routed_weight else None
    cols = _columns([b.shape[2] for b in b_list], n_offset, slice_stride)
    delta = torch.zeros((m * top_k, out_cols), dtype=torch.float64)
    for p in range(m * top_k):
        slot = slots[p // top_k]
        if slot < 0 or slot >= L or enabled[slot] == 0:
            continue
        e = ids[p]
        if e >= 0 and emap is not None:
            e = emap[e]
        if e < 0 or e >= E:
            continue
        for s in range(len(a_list)):
            t = a_list[s][slot, e] @ x[p // top_k_in]  # [R]
            d = b_list[s][slot, e] @ t  # [N_s]
            if weights is not None:
                d = d * weights[p]
            delta[p, cols[s]:cols[s] + d.shape[0]] += d
    return delta.float()
