"""The activation between the two expert GEMMs: Triton kernel and torch reference.

Gated activations read x [P, 2I] and write [P, I]:

    SILU       silu(x[:, :I]) * x[:, I:]
    GELU       gelu_erf(x[:, :I]) * x[:, I:]
    SWIGLUOAI  gpt-oss: gate = x[:, 0::2], up = x[:, 1::2] (interleaved);
               gate = min(gate, 7); up = clamp(up, -7, 7);
               out = (up + 1) * gate * sigmoid(1.702 * gate)

The ``*_NO_MUL`` ones read and write [P, W]: silu(x), gelu_erf(x), relu(x)**2.
All math is fp32; the result is cast to the output dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from vllm.model_executor.layers.fused_moe.config import SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT, MoEActivation
from vllm.platforms.interface import triton_interpreting
from vllm.platforms.pdl import pdl_launch_kwargs

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")


def moe_activation_torch(activation: Union[str, MoEActivation], x: torch.Tensor) -> torch.Tensor:
    """Reference: x [P, W] -> [P, W // 2] (gated) or [P, W], in x.dtype, fp32 math inside."""
    act = MoEActivation.parse(activation)
    xf = x.float()
    if act.is_gated:
        _check_gated_width(x)
    if act == MoEActivation.SILU:
        half = x.shape[-1] // 2
        y = F.silu(xf[:, :half]) * xf[:, half:]
    elif act == MoEActivation.GELU:
        half = x.shape[-1] // 2
        y = _gelu_erf(xf[:, :half]) * xf[:, half:]
    elif act == MoEActivation.SWIGLUOAI:
        gate = xf[:, 0::2].clamp(max=SWIGLUOAI_LIMIT)
        up = xf[:, 1::2].clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
        y = (up + 1.0) * gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate)
    elif act == MoEActivation.SILU_NO_MUL:
        y = F.silu(xf)
    elif act == MoEActivation.GELU_NO_MUL:
        y = _gelu_erf(xf)
    elif act == MoEActivation.RELU2_NO_MUL:
        y = torch.relu(xf).square()
    else:  # pragma: no cover - MoEActivation.parse already rejects unknown names
        raise ValueError(f"unhandled activation {act}")
    return y.to(x.dtype)


def _check_gated_width(x: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"gated activation needs an even width, got {x.shape[-1]}")


def _launch_kwargs(device: torch.device, delta: Optional[torch.Tensor]) -> dict:
    """PDL unless a delta joins: the delta comes from another stream (``experts/lora_overlap.py``), and whether a
    launch that may start before its stream's previous kernel ends (PDL) still waits for an event from another
    stream is not something CUDA documents; without PDL it waits for both streams."""
    return pdl_launch_kwargs(device) if delta is None else {}


def _act_code(act: MoEActivation) -> int:
    from vllm.model_executor.layers.fused_moe.ops import _activation_kernel as k

    return {
        MoEActivation.SILU: k.ACT_SILU,
        MoEActivation.GELU: k.ACT_GELU,
        MoEActivation.SWIGLUOAI: k.ACT_SWIGLUOAI,
        MoEActivation.SILU_NO_MUL: k.ACT_SILU_NO_MUL,
        MoEActivation.GELU_NO_MUL: k.ACT_GELU_NO_MUL,
        MoEActivation.RELU2_NO_MUL: k.ACT_RELU2_NO_MUL,
    }[act]


def moe_activation(
    activation: Union[str, MoEActivation],
    x: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    use_triton: Optional[bool] = None,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply ``activation`` to x [P, W] (fp16/bf16/fp32) and return ``out``.

    out: optional [P, W // 2] (gated) or [P, W] float tensor, written in place;
        allocated in x.dtype when None.  Any strides for x and out.
    delta: optional fp32 [P, W] (any strides) added to x first, the sum rounded to x's dtype: the same
        bits as ``x += delta`` in place (as the LoRA kernels add theirs) and then the activation.  x is
        not written.
    use_triton: None = Triton on CUDA, torch on CPU.  True on CPU runs the
        Triton kernel in the interpreter (needs TRITON_INTERPRET=1); False
        always takes the torch path.
    """
    act = MoEActivation.parse(activation)
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if act.is_gated:
        _check_gated_width(x)
    P, W = x.shape
    w_out = W // 2 if act.is_gated else W
    if out is None:
        out = torch.empty(P, w_out, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (P, w_out) or out.dtype not in _FLOAT_DTYPES or out.device != x.device:
        raise ValueError(
            f"out must be a float [{P}, {w_out}] tensor on {x.device}, got {tuple(out.shape)} {out.dtype} {out.device}"
        )
    if delta is not None and (delta.dtype != torch.float32 or delta.shape != x.shape or delta.device != x.device):
        raise ValueError(f"delta must be fp32 {tuple(x.shape)} on {x.device}, got {delta.dtype} {tuple(delta.shape)} "
                         f"{delta.device}")
    if use_triton is None:
        use_triton = x.is_cuda
    if use_triton and not x.is_cuda and not triton_interpreting():
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")
    if not use_triton:
        out.copy_(moe_activation_torch(act, x if delta is None else (x.float() + delta).to(x.dtype)))
        return out
    if P == 0 or w_out == 0:
        return out

    from vllm.model_executor.layers.fused_moe.ops._activation_kernel import _moe_activation_kernel

    block_n = min(1024, max(16, 1 << (w_out - 1).bit_length()))
    grid = (P, -(-w_out // block_n))
    d = x if delta is None else delta  # never read without HAS_DELTA
    _moe_activation_kernel[grid](
        x, out, w_out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT,
        d, d.stride(0), d.stride(1),
        ACT=_act_code(act),
        BLOCK_N=block_n, HAS_DELTA=delta is not None,
        num_warps=4 if block_n <= 512 else 8, **_launch_kwargs(x.device, delta),
    )
    return out
