"""What the MXFP4 experts classes share: their quant config and ``Mxfp4ExpertsBase``.

Both backends take w1 / w2 as the layer's MXFP4 blocks (uint8 [E_local, N, K/32, 16]) and
find the scales in their ``Mxfp4MoEQuantConfig``; each lives in its own module:
``UnfusedOAITritonExperts`` (``oai_triton_experts.py``, Triton) and ``TorchMxfp4Experts``
(``torch_mxfp4_experts.py``, torch).  The pipeline is ``TwoGemmExperts``', left unfused so
the LoRA seams sit between its steps:

    GEMM1 (MXFP4, + bias) -> apply_w13_lora -> activation (swigluoai for gpt-oss)
    -> GEMM2 (MXFP4, + bias, router-weighted) -> apply_w2_lora -> top-k sum
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.modular_kernel import Support

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe import Mxfp4MmaWeight


@dataclass
class Mxfp4MoEQuantConfig(FusedMoEQuantConfig):
    """MXFP4 expert weights: the e8m0 scales of w13 [E_local, 2I_part, H/32] and w2 [E_local, H, I_part/32].

    Weight-only: the activations stay in float, so ``quant_dtype`` (activation quantization,
    which prepare/finalize would perform) is None.
    """

    w1_scale: Optional[torch.Tensor] = None
    w2_scale: Optional[torch.Tensor] = None
    # the tensor-core copies (``ops/mxfp4_mma_moe.Mxfp4MmaWeight``), when the blocks were repacked at load: then
    # they are the only copy (the blocks and scales above are shape-only views)
    w1_mma: Optional["Mxfp4MmaWeight"] = None
    w2_mma: Optional["Mxfp4MmaWeight"] = None


def mxfp4_moe_quant_config(w1_scale: torch.Tensor, w2_scale: torch.Tensor, w1_bias: Optional[torch.Tensor],
                           w2_bias: Optional[torch.Tensor]) -> Mxfp4MoEQuantConfig:
    return Mxfp4MoEQuantConfig(quant_dtype=None, w1_bias=w1_bias, w2_bias=w2_bias, w1_scale=w1_scale,
                               w2_scale=w2_scale)


class Mxfp4ExpertsBase(TwoGemmExperts):
    """MXFP4 weights (w1 / w2: the blocks; scales and biases in the quant config); subclasses
    supply the two GEMMs."""

    @classmethod
    def supports_quant(cls, quant_config: FusedMoEQuantConfig) -> Support:
        if isinstance(quant_config, Mxfp4MoEQuantConfig):
            return Support.yes()
        return Support.no(f"{cls.__name__} runs MXFP4 weights only")

    def _stage(self, stage: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        qc = self.quant_config
        return (qc.w1_scale, qc.w1_bias) if stage == 1 else (qc.w2_scale, qc.w2_bias)
