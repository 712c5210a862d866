"""The dense LoRA's concatenated shrink: the wide input ``[x | s]`` of a projection whose weight holds the
adapters' B beside its own columns (``vllm/lora/layers/dense_concat.py``).

``lora_concat_shrink(x, a, mapping, out)`` writes ``out[:T, :K] = x`` and, for slice s and slot l,
``out[t, K + (s * L + l) * R : + R] = x[t] @ A[s, l]^T`` where token t's slot is l, zeros elsewhere - one launch
(``_lora_concat_kernel.py``) on CUDA and under the Triton interpreter, torch otherwise.  A slot that holds no
adapter for this layer has zero A, so its columns are zero without an enabled flag.
"""
from __future__ import annotations

import torch

from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import triton_interpreting

BLOCK_M = 16
SLOT_GROUP = 1  # slots of a slice per program (used where it divides the slot count; else 1)
NUM_WARPS = 4
NUM_STAGES = 3
MAX_K_STEPS = 8  # K tiles per program: the chain of dependent loads each program waits through


def block_k_for(K: int) -> int:
    """The K tile: K over at most ``MAX_K_STEPS`` steps, 64 to 512 wide (16 to 64 for small K)."""
    import triton

    return min(512, max(min(64, triton.next_power_of_2(K)), 16, triton.next_power_of_2(-(-K // MAX_K_STEPS))))


def slot_group(L: int) -> int:
    """Slots per program: ``SLOT_GROUP`` where it divides ``L``, else 1."""
    return SLOT_GROUP if SLOT_GROUP >= 1 and L % SLOT_GROUP == 0 else 1


def concat_columns(a: torch.Tensor) -> int:
    """The columns the shrink adds after x's for A buffers ``a`` [S, L, R, K]: S * L * R."""
    S, L, R, _ = a.shape
    return S * L * R


def _check(x: torch.Tensor, a: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor) -> None:
    if x.dim() != 2 or a.dim() != 4 or out.dim() != 2:
        raise ValueError(f"lora_concat_shrink: x [T, K], a [S, L, R, K] and out [T, K + S*L*R] expected, got "
                         f"{tuple(x.shape)}, {tuple(a.shape)}, {tuple(out.shape)}")
    T, K = x.shape
    if a.shape[3] != K or out.shape[1] != K + concat_columns(a) or out.shape[0] < T or mapping.shape[0] < T:
        raise ValueError(f"lora_concat_shrink: x {tuple(x.shape)}, a {tuple(a.shape)}, out {tuple(out.shape)} and "
                         f"mapping {tuple(mapping.shape)} do not agree")
    if out.dtype != x.dtype:
        raise ValueError(f"lora_concat_shrink: out is {out.dtype}, x is {x.dtype}")


def lora_concat_shrink_torch(x: torch.Tensor, a: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor) -> None:
    """The torch path (CPU), in fp32 like the kernel's accumulator."""
    T, K = x.shape
    S, L, R, _ = a.shape
    out[:T, :K] = x
    prod = torch.einsum("tk,slrk->tslr", x.float(), a.float())
    own = mapping[:T].long()[:, None] == torch.arange(L, device=x.device)[None, :]  # [T, L]
    out[:T, K:] = (prod * own[:, None, :, None]).reshape(T, S * L * R).to(out.dtype)


def lora_concat_shrink(x: torch.Tensor, a: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor) -> None:
    """Write the wide input of x into ``out`` (see the module docstring); ``mapping`` [>= T] int32 slots, -1 for
    none."""
    _check(x, a, mapping, out)
    T, K = x.shape
    if T == 0:
        return
    if not (x.is_cuda or triton_interpreting()):
        lora_concat_shrink_torch(x, a, mapping, out)
        return
    import triton

    from vllm.lora.ops.triton_ops._lora_concat_kernel import lora_concat_shrink_kernel

    S, L, R, _ = a.shape
    block_k = block_k_for(K)
    g = slot_group(L)
    num_sl = S * (L // g)
    grid = (triton.cdiv(T, BLOCK_M), num_sl + triton.cdiv(K, block_k))  # then the programs that copy x
    lora_concat_shrink_kernel[grid](
        x, a, mapping, out, T, K, L, R, x.stride(0), x.stride(1), *a.stride(), out.stride(0), out.stride(1), num_sl,
        G=g, BLOCK_M=BLOCK_M, BLOCK_N=max(16, triton.next_power_of_2(g * R)), BLOCK_K=block_k,
        UPCAST=triton_interpreting(), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **pdl_launch_kwargs(x.device))
