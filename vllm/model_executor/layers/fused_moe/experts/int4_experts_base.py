"""What the packed-int4 (W4A16) experts classes share: ``Int4ExpertsBase``.

Both int4 backends derive from it, each in its own module: ``TorchInt4Experts``
(``torch_int4_experts.py``, torch) and ``MarlinExperts`` (``marlin_experts.py``, Triton).
"""
from __future__ import annotations

from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig, MoEActivation
from vllm.model_executor.layers.fused_moe.experts.two_gemm import TwoGemmExperts
from vllm.model_executor.layers.fused_moe.int4_weights import Int4MoEQuantConfig
from vllm.model_executor.layers.fused_moe.modular_kernel import Support


def check_int4_quant(cls: type, quant_config: FusedMoEQuantConfig) -> Support:
    if isinstance(quant_config, Int4MoEQuantConfig) and quant_config.w13 is not None and quant_config.w2 is not None:
        return Support.yes()
    return Support.no(f"{cls.__name__} runs packed int4 expert weights (Int4MoEQuantConfig) only")


class Int4ExpertsBase(TwoGemmExperts):
    """What every packed-int4 experts class shares: the quant config it runs, the activations, GEMM1's width."""

    quant_config: Int4MoEQuantConfig

    @classmethod
    def supports_quant(cls, quant_config: FusedMoEQuantConfig) -> Support:
        return check_int4_quant(cls, quant_config)

    @classmethod
    def supports_activation(cls, activation: MoEActivation) -> Support:
        if activation.value == "swigluoai":
            return Support.no(f"{cls.__name__} does not run gpt-oss's interleaved swigluoai experts")
        return Support.yes()

    def _w13_rows(self, n_from_weight: int) -> int:
        # from the packed weight: w1 is [E, K/8, N] words, so w1.shape[1] is K/8
        return self.quant_config.w13.n
