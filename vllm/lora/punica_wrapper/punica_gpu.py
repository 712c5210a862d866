"""Punica wrapper whose MoE LoRA compute runs as Triton kernels.

On CUDA this is the production path; on CPU tensors it runs under the Triton
interpreter (``TRITON_INTERPRET=1``), which is how CI tests the kernels.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

if TYPE_CHECKING:
    from vllm.kernel_configs.tile_config import MoELoRATileConfig
    from vllm.lora.lora_context import MoELoRAContext


class PunicaWrapperGPU(PunicaWrapperBase):
    """Sorted "virtual expert" path, or the small-batch path that skips sorting."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.lora.ops.triton_ops.lora_linear import LoRALinearMetadata

        # Tokens grouped by slot for the dense LoRA kernels: regions of the per-step buffer, made on the
        # host with the mapping and copied with it (or on the device from a device mapping).
        self._linear_meta = LoRALinearMetadata(sorted_token_ids=self.region("sorted_token_ids"),
                                               slot_counts=self.region("slot_counts"))

    def _extra_regions(self) -> list[tuple[str, int]]:
        return [("slot_counts", self.max_loras), ("sorted_token_ids", self.max_num_batched_tokens)]

    def _fill_host(self, buf: np.ndarray, host: np.ndarray, slot_counts: np.ndarray) -> int:
        # the same grouping as lora_linear_metadata: stable by slot, tokens without an adapter last
        n, L = host.size, self.max_loras
        lo, _ = self._regions["slot_counts"]
        buf[lo:lo + L] = slot_counts
        lo, _ = self._regions["sorted_token_ids"]
        buf[lo:lo + n] = np.argsort(np.where(host < 0, L, host), kind="stable")
        return lo + n

    def _fill_device(self) -> None:
        from vllm.lora.ops.triton_ops.lora_linear import lora_linear_metadata

        lora_linear_metadata(self.token_lora_indices, self.max_loras, out=self._linear_meta)

    def linear_metadata(self, num_tokens: int) -> Optional[Any]:
        # made from the step's n tokens: valid for n <= T rows (rows past n are on slot -1)
        return self._linear_meta if num_tokens >= self._num_tokens else None

    def _add_lora_linear(self, y, x, lora_a, lora_b, *, token_lora_mapping, adapter_enabled, output_offsets) -> None:
        from vllm.lora.ops.triton_ops.lora_linear import add_lora_linear

        add_lora_linear(y, x, lora_a, lora_b, token_lora_mapping, adapter_enabled=adapter_enabled,
                        output_offsets=output_offsets, meta=self._linear_meta)

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _use_small_batch(self, num_pairs: int, num_experts: int, max_loras: int, rank: int) -> bool:
        from vllm.lora.ops.triton_ops.moe_lora_config import use_small_batch_path

        return use_small_batch_path(num_pairs, num_experts, max_loras, rank)

    def _config(self, op: str, *, num_pairs: int, num_experts: int, max_loras: int, rank: int, K: int, N: int,
                num_slices: int, dtype: torch.dtype, use_tuned_config: bool,
                small_batch: Optional[bool] = None) -> "MoELoRATileConfig":
        from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

        return get_moe_lora_config(op, num_pairs=num_pairs, num_experts=num_experts, max_loras=max_loras,
                                   rank=rank, K=K, N=N, num_slices=num_slices, dtype=dtype,
                                   use_tuned_config=use_tuned_config, device_name=self._device_name(),
                                   small_batch=small_batch)

    def _align(self, topk_ids: torch.Tensor, mapping: torch.Tensor, *, num_experts: int, max_loras: int,
               adapter_enabled: torch.Tensor, expert_map: Optional[torch.Tensor],
               config: "MoELoRATileConfig") -> Any:
        from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size

        return moe_lora_align_block_size(topk_ids, mapping, num_experts=num_experts, max_loras=max_loras,
                                         block_size=config.block_size_m, adapter_enabled=adapter_enabled,
                                         expert_map=expert_map)

    def _fused(self, out, x, lora_a, lora_b, **kw) -> None:
        from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora

        fused_moe_lora(out, x, lora_a, lora_b, **kw)

    def _shrink(self, x, lora_a, **kw) -> torch.Tensor:
        from vllm.lora.ops.triton_ops.fused_moe_lora import moe_lora_shrink

        return moe_lora_shrink(x, lora_a, **kw)

    def _expand(self, out, shrunk, lora_b, **kw) -> None:
        from vllm.lora.ops.triton_ops.fused_moe_lora import moe_lora_expand

        moe_lora_expand(out, shrunk, lora_b, **kw)
