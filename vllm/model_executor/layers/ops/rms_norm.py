"""RMSNorm and residual-add + RMSNorm in one Triton launch each, with torch references.

    rms_norm(x, w, eps)                      -> w * norm(x)
    fused_add_rms_norm(x, residual, w, eps)  -> (w * norm(x + residual), x + residual)

``lora_shrink`` (a ``PendingDelta`` of the next projection): the same launch also writes the fp32 LoRA shrink of
the normalised rows; ``lora_delta`` (fused_add_rms_norm: the previous projection's): x gets its delta first,
rounded once, as the projection's LoRA add would (``pending_delta.py``).

``norm(h) = h * rsqrt(mean(h^2) + eps)`` in float32, rounded to x's dtype before the weight
multiply (transformers' Llama-family rounding); the residual sum is rounded to x's dtype.  The
unfused torch version costs 7-9 kernels per call on a GPU (casts, pow, mean, rsqrt, muls, add).
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs
from vllm.triton_utils import next_power_of_2

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One program holds a whole row; wider rows fall back to torch.
_MAX_TRITON_WIDTH = 1 << 16


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: norm over the last dim in float32, rounded to x.dtype, times ``weight``."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (rms_norm_torch(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


def _use_triton(x: torch.Tensor, weight: torch.Tensor, use_triton: Optional[bool]) -> bool:
    """Triton when asked (None: on CUDA) and the shapes / dtypes are ones the kernel covers."""
    if use_triton is None:
        use_triton = x.is_cuda
    if not use_triton:
        return False
    if not x.is_cuda and not triton_interpreting():
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")
    return (x.dtype in _FLOAT_DTYPES and weight.dtype == x.dtype and x.shape[-1] <= _MAX_TRITON_WIDTH
            and weight.is_contiguous())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, N] with unit stride in the last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"RMSNorm over {tuple(weight.shape)} got input of shape {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"RMSNorm weight on {weight.device} but input on {x.device}")


def _launch(x2: torch.Tensor, r2: Optional[torch.Tensor], weight: torch.Tensor, eps: float, out: torch.Tensor,
            res_out: Optional[torch.Tensor], lora_shrink: Optional[PendingDelta] = None,
            lora_delta: Optional[PendingDelta] = None) -> None:
    from vllm.model_executor.layers.ops._rms_norm_kernel import _rms_norm_kernel

    rows, n = x2.shape
    if rows == 0:
        if lora_shrink is not None:
            lora_shrink.new_part(0, 1, x2.device)
        return
    block = max(16, next_power_of_2(n))
    has_res = r2 is not None
    extra: dict = {}
    shrink_programs = 0
    if lora_shrink is not None:
        shrink_programs, extra = lora_shrink.shrink_kernel_args(rows, n, x2.device)
    warps = min(16, max(1, block // 256))
    if lora_delta is not None:  # its B rows stay in registers from before the wait: <= 128 values a thread
        extra.update(lora_delta.delta_kernel_args())
        warps = min(16, max(warps, block * lora_delta.block_r // 4096))
    _rms_norm_kernel[(rows + shrink_programs,)](
        x2, r2 if has_res else x2, weight, out, res_out if has_res else out,
        n, float(eps),
        x2.stride(0), r2.stride(0) if has_res else 0, out.stride(0), res_out.stride(0) if has_res else 0,
        HAS_RESIDUAL=has_res, BLOCK_N=block,
        num_warps=warps, **pdl_launch_kwargs(x2.device),
        n_rows=rows + shrink_programs, **({"n_norm": rows} | extra),
    )


def _check_pending(x: torch.Tensor, lora_shrink: Optional[PendingDelta], lora_delta: Optional[PendingDelta]) -> None:
    if lora_shrink is not None and lora_delta is not None:
        raise ValueError("an RMSNorm launch either shrinks the next projection's LoRA or adds the previous one's "
                         "delta, not both")
    rows = x.numel() // max(1, x.shape[-1])
    for p in (lora_shrink, lora_delta):
        if p is not None:
            p.check(rows, x.device)
    if lora_delta is not None and lora_delta.slice_sizes != (x.shape[-1],):
        raise ValueError(f"lora_delta of slices {lora_delta.slice_sizes} for rows of {x.shape[-1]}")
    if lora_shrink is not None and lora_shrink.a.shape[-1] != x.shape[-1]:
        raise ValueError(f"lora_shrink needs A over the row's {x.shape[-1]} columns")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_triton: Optional[bool] = None,
             lora_shrink: Optional[PendingDelta] = None) -> torch.Tensor:
    """x [..., N] (any leading shape), weight [N] -> [..., N] in x.dtype (one launch on CUDA).

    ``lora_shrink``: see the module docstring."""
    _check(x, weight)
    _check_pending(x, lora_shrink, None)
    if not _use_triton(x, weight, use_triton):
        out = rms_norm_torch(x, weight, eps)
        if lora_shrink is not None:
            lora_shrink.shrink_torch(out.reshape(-1, x.shape[-1]))
        return out
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, None, weight, eps, out, None, lora_shrink=lora_shrink)
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       use_triton: Optional[bool] = None, lora_shrink: Optional[PendingDelta] = None,
                       lora_delta: Optional[PendingDelta] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * norm(x + residual), x + residual): one launch on CUDA that reads x and residual once and writes
    the new residual and the normed output.  x and residual: same shape and dtype; ``lora_shrink``,
    ``lora_delta``: see the module docstring."""
    _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match the input "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    _check_pending(x, lora_shrink, lora_delta)
    too_wide = lora_delta is not None and not lora_delta.fits(x.shape[-1])  # its B rows would spill: torch
    if not _use_triton(x, weight, use_triton) or too_wide:
        if lora_delta is not None:
            x = lora_delta.add_torch(0, x.reshape(-1, x.shape[-1])).view(x.shape)
        out, res = fused_add_rms_norm_torch(x, residual, weight, eps)
        if lora_shrink is not None:
            lora_shrink.shrink_torch(out.reshape(-1, x.shape[-1]))
        return out, res
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, r2, weight, eps, out, res_out, lora_shrink=lora_shrink, lora_delta=lora_delta)
    return out.view(x.shape), res_out.view(x.shape)
