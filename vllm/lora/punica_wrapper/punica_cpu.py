"""Punica wrapper in plain torch: the same API without a GPU or Triton."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

if TYPE_CHECKING:
    from vllm.kernel_configs.tile_config import MoELoRATileConfig


class PunicaWrapperCPU(PunicaWrapperBase):
    """Groups pairs by (slot, expert) with torch ops; no sorting step of its own."""

    def _use_small_batch(self, num_pairs: int, num_experts: int, max_loras: int, rank: int) -> bool:
        return True  # the torch ops group pairs themselves

    def _config(self, op: str, **kw: Any) -> Optional["MoELoRATileConfig"]:
        return None

    def _align(self, *args, **kwargs) -> Any:  # pragma: no cover - never called (small-batch always)
        return None

    def _fused(self, out, x, lora_a, lora_b, **kw) -> None:
        from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch

        fused_moe_lora_torch(out, x, lora_a, lora_b, **kw)

    def _shrink(self, x, lora_a, **kw) -> torch.Tensor:
        from vllm.lora.ops.torch_ops.moe_lora import moe_lora_shrink_torch

        return moe_lora_shrink_torch(x, lora_a, **kw)

    def _expand(self, out, shrunk, lora_b, **kw) -> None:
        from vllm.lora.ops.torch_ops.moe_lora import moe_lora_expand_torch

        moe_lora_expand_torch(out, shrunk, lora_b, **kw)

    def _add_lora_linear(self, y, x, lora_a, lora_b, *, token_lora_mapping, adapter_enabled, output_offsets) -> None:
        from vllm.lora.ops.torch_ops.lora_linear import add_lora_linear_torch

        add_lora_linear_torch(y, x, lora_a, lora_b, token_lora_mapping, adapter_enabled=adapter_enabled,
                              output_offsets=output_offsets)
