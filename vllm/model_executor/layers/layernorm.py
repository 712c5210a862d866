"""RMSNorm, optionally fused with the residual add that precedes it.

    forward(x)            -> y
    forward(x, residual)  -> (y, x + residual)

The residual sum is rounded to the input dtype (as an unfused ``residual + x``
would be); the normalisation itself runs in float32 and is cast back to the
input dtype before the weight is applied, as transformers' Llama-family norms do.
On CUDA each call is one Triton launch (``ops/rms_norm.py``); on CPU the torch path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.model_executor.layers.ops.rms_norm import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """``use_triton``: None = the Triton kernel on CUDA, torch on CPU; True / False force it (tests)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, params_dtype: Optional[torch.dtype] = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.use_triton: Optional[bool] = None
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype(),
                                              device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
        if loaded_shard_id is not None or loaded_weight.shape != param.shape:
            raise ValueError(f"RMSNorm weight: expected shape {tuple(param.shape)}, got {tuple(loaded_weight.shape)}")
        param.data.copy_(loaded_weight)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, *,
                lora_shrink: Optional[PendingDelta] = None,
                lora_delta: Optional[PendingDelta] = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``lora_shrink`` / ``lora_delta``: the next projection's LoRA shrink written by this launch, the previous
        projection's delta added to x first (with a residual only; ``ops/pending_delta.py``)."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm over {self.hidden_size} got input of shape {tuple(x.shape)}")
        if residual is None:
            if lora_delta is not None:
                raise ValueError("lora_delta needs the residual form (the add before the norm)")
            return rms_norm(x, self.weight, self.variance_epsilon, use_triton=self.use_triton,
                            lora_shrink=lora_shrink)
        return fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon, use_triton=self.use_triton,
                                  lora_shrink=lora_shrink, lora_delta=lora_delta)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
