"""Fused Triton ops of the dense layers (norms, rotary), each beside its torch reference.

Public launchers live in the non-underscore modules; ``@triton.jit`` bodies in the ``_*_kernel``
modules, imported only when a Triton path runs.  Every launcher takes ``use_triton``: None = Triton
on CUDA tensors, torch elsewhere (the CPU engine); True on CPU needs ``TRITON_INTERPRET=1``.
"""
from vllm.model_executor.layers.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_torch
from vllm.model_executor.layers.ops.rms_norm import (fused_add_rms_norm, fused_add_rms_norm_torch, rms_norm,
                                                     rms_norm_torch)

__all__ = ["rms_norm", "rms_norm_torch", "fused_add_rms_norm", "fused_add_rms_norm_torch", "qk_norm_rope",
           "qk_norm_rope_torch"]
