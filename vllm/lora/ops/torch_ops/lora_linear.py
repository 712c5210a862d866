"""Dense (multi-)LoRA of a linear layer in plain PyTorch: the CPU implementation and the loop reference.

Same math and arguments as ``vllm.lora.ops.triton_ops.lora_linear`` (read its
module docstring): per token t with slot = token_lora_mapping[t] >= 0 (and
enabled), per slice s::

    y[t, off_s : off_s + N_s] += (x[t] @ A_s[slot]^T) @ B_s[slot]^T

with the shrink kept in fp32 until it has been multiplied by B.

* ``add_lora_linear_torch`` - one gather and two small matmuls per slot present.
* ``lora_linear_reference`` - a per-token Python loop in float64; what tests trust.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vllm.lora.ops.slices import slice_offsets


def _enabled_slots(token_lora_mapping: torch.Tensor, num_tokens: int, max_loras: int,
                   adapter_enabled: Optional[torch.Tensor]) -> list[int]:
    mapping = token_lora_mapping[:num_tokens]
    slots = [s for s in torch.unique(mapping).tolist() if 0 <= s < max_loras]
    if adapter_enabled is not None:
        enabled = adapter_enabled.tolist()
        slots = [s for s in slots if enabled[s]]
    return slots


def add_lora_linear_torch(y: torch.Tensor, x: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                          lora_b_stacked: Sequence[torch.Tensor], token_lora_mapping: torch.Tensor, *,
                          adapter_enabled: Optional[torch.Tensor] = None,
                          output_offsets: Optional[Sequence[int]] = None, **unused) -> None:
    """y += LoRA delta of every token, in place (fp32 intermediate; result rounded once into y's dtype)."""
    del unused  # launch metadata of the Triton op (``meta``, ``config``)
    a_list, b_list = list(lora_a_stacked), list(lora_b_stacked)
    T = x.shape[0]
    if T == 0:
        return
    L = a_list[0].shape[0]
    offs = slice_offsets([b.shape[1] for b in b_list], output_offsets)
    mapping = token_lora_mapping[:T]
    for slot in _enabled_slots(token_lora_mapping, T, L, adapter_enabled):
        idx = torch.nonzero(mapping == slot).flatten()
        xs = x[idx].float()
        for a, b, off in zip(a_list, b_list, offs):
            d = (xs @ a[slot].float().T) @ b[slot].float().T
            cols = slice(off, off + b.shape[1])
            y[idx, cols] = (y[idx, cols].float() + d).to(y.dtype)


def lora_linear_reference(x: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                          lora_b_stacked: Sequence[torch.Tensor], token_lora_mapping: Sequence[int] | torch.Tensor, *,
                          out_cols: int, adapter_enabled: Optional[Sequence[int] | torch.Tensor] = None,
                          output_offsets: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The LoRA delta, float64 [T, out_cols], by a per-token loop on the CPU.

    Rows of tokens without an (enabled) adapter and columns outside the slices are exactly 0.
    """
    a_list = [a.detach().double().cpu() for a in lora_a_stacked]
    b_list = [b.detach().double().cpu() for b in lora_b_stacked]
    x = x.detach().double().cpu()
    slots = [int(s) for s in (token_lora_mapping.tolist() if isinstance(token_lora_mapping, torch.Tensor)
                              else token_lora_mapping)]
    enabled = None if adapter_enabled is None else [int(e) for e in (
        adapter_enabled.tolist() if isinstance(adapter_enabled, torch.Tensor) else adapter_enabled)]
    offs = slice_offsets([b.shape[1] for b in b_list], output_offsets)
    delta = torch.zeros(x.shape[0], out_cols, dtype=torch.float64)
    for t in range(x.shape[0]):
        slot = slots[t]
        if slot < 0 or slot >= a_list[0].shape[0] or (enabled is not None and enabled[slot] == 0):
            continue
        for a, b, off in zip(a_list, b_list, offs):
            shrunk = a[slot] @ x[t]  # [R]
            delta[t, off:off + b.shape[1]] += b[slot] @ shrunk
    return delta
