"""Configuration dataclasses of a fused-MoE layer: problem shape, parallelism, quantization.

Built once at layer construction and passed down; kernels receive plain ints and
tensors taken from them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch


class MoEActivation(str, enum.Enum):
    """Activation between the two expert GEMMs.

    Gated activations read a GEMM1 output of width 2I and write width I; the
    ``*_NO_MUL`` ones read and write width I.
    """

    SILU = "silu"  # silu(gate) * up, gate = first I columns, up = last I
    GELU = "gelu"  # gelu(gate) * up (tanh-free, erf form)
    SWIGLUOAI = "swigluoai"  # gpt-oss: interleaved gate/up (even = gate, odd = up), clamped
    SILU_NO_MUL = "silu_no_mul"
    GELU_NO_MUL = "gelu_no_mul"
    RELU2_NO_MUL = "relu2_no_mul"  # relu(x) ** 2

    @property
    def is_gated(self) -> bool:
        return self in (MoEActivation.SILU, MoEActivation.GELU, MoEActivation.SWIGLUOAI)

    @classmethod
    def parse(cls, value: "str | MoEActivation") -> "MoEActivation":
        if isinstance(value, MoEActivation):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown MoE activation {value!r}; expected one of {names}") from None


# gpt-oss clamped SwiGLU constants (FACTS.md section 1).
SWIGLUOAI_ALPHA = 1.702
SWIGLUOAI_LIMIT = 7.0


@dataclass(frozen=True)
class FusedMoEParallelConfig:
    """How the experts are split across ranks.

    tp_size / tp_rank: tensor parallelism over the intermediate dimension I.
    ep_size / ep_rank: expert parallelism (experts split across ranks).
    """

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if not (0 <= self.ep_rank < self.ep_size):
            raise ValueError(f"ep_rank {self.ep_rank} out of range for ep_size {self.ep_size}")

    @property
    def use_ep(self) -> bool:
        return self.ep_size > 1


@dataclass(frozen=True)
class FusedMoEConfig:
    """Problem shape of one fused-MoE layer (global numbers; local ones derived)."""

    num_experts: int  # E, global routed experts
    experts_per_token: int  # top_k
    hidden_dim: int  # H
    intermediate_size: int  # I, per expert, before TP sharding
    activation: MoEActivation = MoEActivation.SILU
    in_dtype: torch.dtype = torch.bfloat16
    has_bias: bool = False
    parallel_config: FusedMoEParallelConfig = field(default_factory=FusedMoEParallelConfig)
    max_num_tokens: int = 8192
    moe_backend: Optional[str] = None  # explicit backend request, None = automatic
    lora_enabled: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", MoEActivation.parse(self.activation))
        if self.experts_per_token < 1 or self.experts_per_token > self.num_experts:
            raise ValueError(
                f"top_k={self.experts_per_token} must be between 1 and num_experts={self.num_experts}"
            )
        pc = self.parallel_config
        if self.intermediate_size % pc.tp_size:
            raise ValueError(f"intermediate_size {self.intermediate_size} is not divisible by tp_size {pc.tp_size}")
        if self.num_experts % pc.ep_size:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by ep_size {pc.ep_size}: expert "
                             "parallelism gives every rank the same number of whole experts")

    @property
    def top_k(self) -> int:
        return self.experts_per_token

    @property
    def local_num_experts(self) -> int:
        return self.num_experts // self.parallel_config.ep_size

    @property
    def intermediate_size_per_partition(self) -> int:
        return self.intermediate_size // self.parallel_config.tp_size

    @property
    def w13_out_dim(self) -> int:
        """Rows of one expert's local w13: 2I_part for gated, I_part otherwise."""
        mult = 2 if self.activation.is_gated else 1
        return mult * self.intermediate_size_per_partition


@dataclass
class FusedMoEQuantConfig:
    """Quantization scheme of the expert weights, and the per-expert biases.

    ``quant_dtype`` None means unquantized (weights in the activation dtype).
    Biases: w1_bias [E_local, w13_out_dim], w2_bias [E_local, H]; None when absent.
    """

    quant_dtype: Optional[torch.dtype] = None
    w1_bias: Optional[torch.Tensor] = None
    w2_bias: Optional[torch.Tensor] = None

    @property
    def is_quantized(self) -> bool:
        return self.quant_dtype is not None


FUSED_MOE_UNQUANTIZED_CONFIG = FusedMoEQuantConfig()


def biased_moe_quant_config(w1_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor]) -> FusedMoEQuantConfig:
    return FusedMoEQuantConfig(quant_dtype=None, w1_bias=w1_bias, w2_bias=w2_bias)
