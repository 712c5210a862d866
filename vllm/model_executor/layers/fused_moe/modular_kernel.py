"""The modular fused-MoE kernel: prepare -> experts -> finalize, LoRA explicit.

    hidden_states [M, H], topk_weights / topk_ids [M, top_k] (from the router)
          |
          v
    FusedMoEPrepareAndFinalize.prepare   quantize the activations, dispatch to
          |                              expert ranks (no-op without EP); the LoRA
          |                              slots of the tokens travel with them
          v
    FusedMoEExpertsModular.apply         GEMM1 (w13) -> apply_w13_lora(ctx)
          |                              -> activation -> GEMM2 (w2)
          |                              -> apply_w2_lora(ctx) -> (top-k sum)
          v
    FusedMoEPrepareAndFinalize.finalize  router weighting and top-k reduction
                                         (unless the experts did it), combine
          |
          v
    output [M, H]

``FusedMoEPrepareAndFinalize`` owns communication and activation quantization.
One implementation per scheme lives in ``prepare_finalize/``.

``FusedMoEExperts`` is the compute: one implementation per backend in
``experts/``.  Each declares what it supports (dtype, activation, quantization,
parallelism) with a reason when it does not, whether it supports LoRA, its
block shape, whether it is monolithic, and the workspaces it needs; the kernel
allocates those once and hands them over.

``FusedMoEKernel`` joins one of each and runs the pipeline.  ``lora_context``
(a ``MoELoRAContext`` or None) is threaded through unchanged to the experts'
``apply``; an experts class that supports LoRA calls ``apply_w13_lora`` and
``apply_w2_lora`` (``experts/lora_mixin.py``) at the two seams.  Nothing is
patched: every method stays the class's own.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
    MoEActivation,
)

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext


@dataclass(frozen=True)
class Support:
    """A capability answer: ``ok``, and ``reason`` when not."""

    ok: bool
    reason: str = ""

    @staticmethod
    def yes() -> "Support":
        return Support(True)

    @staticmethod
    def no(reason: str) -> "Support":
        return Support(False, reason)

    def __bool__(self) -> bool:
        return self.ok

    @staticmethod
    def triton_on(device: torch.device) -> "Support":
        """Whether Triton kernels can run on ``device``: CUDA, or the interpreter (TRITON_INTERPRET=1)."""
        from vllm.platforms.interface import has_triton, triton_interpreting

        if not has_triton():
            return Support.no("Triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            return Support.no(f"Triton kernels need a CUDA device (got {device.type}; TRITON_INTERPRET=1 runs them "
                              "on CPU)")
        return Support.yes()


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare`` hands to the experts.

    a1q: [M', H] activations (quantized if the scheme asks for it).
    a1q_scale: activation scales, or None.
    topk_ids / topk_weights: [M', top_k], after any dispatch.
    token_lora_mapping: [M'] int32 LoRA slot of each dispatched row (-1 = none): the LoRA
        mapping follows the tokens.  The one given to ``prepare`` when no row moved; None
        without LoRA.
    handle: what ``finalize`` needs to send the rows back (scheme-specific), or None.
    """

    a1q: torch.Tensor
    a1q_scale: Optional[torch.Tensor]
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    token_lora_mapping: Optional[torch.Tensor] = None
    handle: Any = None


@dataclass(frozen=True)
class WorkspaceShapes:
    """Scratch the experts need for M tokens: two buffers and the output's shape."""

    workspace13: tuple[int, ...]
    workspace2: tuple[int, ...]
    output: tuple[int, ...]


def two_gemm_workspace_shapes(moe_config: FusedMoEConfig, M: int, N: int, K: int, top_k: int) -> WorkspaceShapes:
    """Scratch of a GEMM1 -> activation -> GEMM2 experts class that sums the top-k itself.

    workspace13 holds the GEMM1 output [M*top_k, N], then the GEMM2 output
    [M*top_k, K]; workspace2 holds the activation output.
    """
    pairs = M * top_k
    act_n = N // 2 if moe_config.activation.is_gated else N
    return WorkspaceShapes(workspace13=(pairs * max(N, K),), workspace2=(pairs * act_n,), output=(M, K))


class TopKWeightAndReduce(ABC):
    """How the per-pair expert outputs become one row per token."""

    @abstractmethod
    def apply(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, apply_router_weight_on_input: bool) -> torch.Tensor: ...


class TopKWeightAndReduceNoOP(TopKWeightAndReduce):
    """The experts already weighted and summed: [M, H] in, copied to ``output``."""

    def apply(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, apply_router_weight_on_input: bool) -> torch.Tensor:
        if output.data_ptr() != fused_expert_output.data_ptr():
            output.copy_(fused_expert_output)
        return output


class TopKWeightAndReduceContiguous(TopKWeightAndReduce):
    """Experts return [M, top_k, H] unweighted: weight (unless done on input) and sum."""

    def apply(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, apply_router_weight_on_input: bool) -> torch.Tensor:
        M, top_k = topk_ids.shape
        x = fused_expert_output.view(M, top_k, -1)
        if not apply_router_weight_on_input:
            x = x * topk_weights.view(M, top_k, 1).to(x.dtype)
        torch.sum(x, dim=1, out=output)
        return output


class FusedMoEPrepareAndFinalize(ABC):
    """Activation quantization and dispatch before the experts; combine after.

    ``prepare`` gets this rank's tokens after routing (and, with LoRA, their adapter
    slots) and returns the rows this rank's experts compute, with their routing and
    slots; ``finalize`` turns the experts' output back into one row per token of
    this rank, in ``output`` [M, H].
    """

    #: ``finalize`` only applies the experts' weight-and-reduce to rows that are already this rank's tokens
    #: (no combine): experts whose reduce is a no-op may then write ``output`` itself (no copy).
    finalizes_in_place: bool = False

    @abstractmethod
    def prepare(self, a1: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                num_experts: int, expert_map: Optional[torch.Tensor], apply_router_weight_on_input: bool,
                quant_config: FusedMoEQuantConfig,
                token_lora_mapping: Optional[torch.Tensor] = None) -> PrepareResult: ...

    @abstractmethod
    def finalize(self, output: torch.Tensor, fused_expert_output: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, *, apply_router_weight_on_input: bool,
                 weight_and_reduce: TopKWeightAndReduce, handle: Any = None) -> None: ...


class FusedMoEExperts(ABC):
    """Base of every experts implementation.

    Subclasses declare what they support; ``supports_lora`` is False unless an
    implementation adds LoRA at the two seams.  Construction takes the layer's
    ``FusedMoEConfig`` and ``FusedMoEQuantConfig``.
    """

    def __init__(self, moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig) -> None:
        self.moe_config = moe_config
        self.quant_config = quant_config

    # ---- capabilities -------------------------------------------------------
    @classmethod
    def supports_lora(cls) -> bool:
        return False

    @classmethod
    def lora_unsupported_reason(cls) -> str:
        return f"{cls.__name__} does not implement the LoRA seams (apply_w13_lora / apply_w2_lora)"

    @property
    def block_shape(self) -> Optional[list[int]]:
        """Quantization block shape [n, k] of block-quantized weights; None otherwise."""
        return None

    @property
    def is_monolithic(self) -> bool:
        """True when routing and experts run as one opaque op (no prepare/finalize seams)."""
        return False

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> Support:
        return Support.yes() if dtype in (torch.float16, torch.bfloat16, torch.float32) else Support.no(
            f"{cls.__name__} does not support dtype {dtype}")

    @classmethod
    def supports_activation(cls, activation: MoEActivation) -> Support:
        return Support.yes()

    @classmethod
    def supports_quant(cls, quant_config: FusedMoEQuantConfig) -> Support:
        return Support.yes() if not quant_config.is_quantized else Support.no(
            f"{cls.__name__} supports unquantized weights only, not {quant_config.quant_dtype}")

    @classmethod
    def supports_parallel(cls, parallel_config: FusedMoEParallelConfig) -> Support:
        return Support.yes()

    @classmethod
    def supports_device(cls, device: torch.device) -> Support:
        return Support.yes()

    @classmethod
    def check_config(cls, moe_config: FusedMoEConfig, quant_config: FusedMoEQuantConfig,
                     device: torch.device) -> Support:
        """First unsupported aspect of this problem, or yes."""
        for answer in (cls.supports_device(device), cls.supports_dtype(moe_config.in_dtype),
                       cls.supports_activation(moe_config.activation), cls.supports_quant(quant_config),
                       cls.supports_parallel(moe_config.parallel_config)):
            if not answer:
                return answer
        if moe_config.lora_enabled and not cls.supports_lora():
            return Support.no(cls.lora_unsupported_reason())
        return Support.yes()

    # ---- work -----------------------------------------------------------------
    def workspace_shapes(self, M: int, N: int, K: int, top_k: int, local_num_experts: int) -> WorkspaceShapes:
        """Scratch for M tokens; N = w13 rows, K = hidden size.  Default: no workspace."""
        return WorkspaceShapes(workspace13=(0,), workspace2=(0,), output=(M, K))

    def finalize_weight_and_reduce_impl(self) -> TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()


class FusedMoEExpertsModular(FusedMoEExperts):
    """Experts that run between a prepare and a finalize step."""

    @abstractmethod
    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: MoEActivation,
              global_num_experts: int, expert_map: Optional[torch.Tensor], a1q_scale: Optional[torch.Tensor],
              workspace13: torch.Tensor, workspace2: torch.Tensor, apply_router_weight_on_input: bool,
              lora_context: Optional["MoELoRAContext"] = None) -> None:
        """Compute the experts into ``output`` (shape from ``workspace_shapes``).

        w1: [E_local, N, H] (N = 2I_part gated, I_part otherwise); w2: [E_local, H, I_part].
        """


class FusedMoEKernel:
    """One prepare/finalize and one experts implementation, run as a pipeline."""

    def __init__(self, prepare_finalize: FusedMoEPrepareAndFinalize, fused_experts: FusedMoEExpertsModular) -> None:
        self.prepare_finalize = prepare_finalize
        self.fused_experts = fused_experts
        self._workspaces: dict[tuple, torch.Tensor] = {}

    def supports_lora(self) -> bool:
        return self.fused_experts.supports_lora()

    @property
    def is_monolithic(self) -> bool:
        return self.fused_experts.is_monolithic

    def _workspace(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A scratch buffer of ``shape``, viewed out of one allocation that only grows."""
        numel = 1
        for s in shape:
            numel *= s
        key = (name, dtype, device)
        buf = self._workspaces.get(key)
        if buf is None or buf.numel() < numel:
            # a normal tensor even when first needed under inference_mode (e.g. CUDA-graph capture), so a
            # later forward under no_grad may still write it
            with torch.inference_mode(False):
                buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._workspaces[key] = buf
        return buf[:numel].view(shape)

    def apply(self, hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: MoEActivation, global_num_experts: int,
              expert_map: Optional[torch.Tensor] = None, apply_router_weight_on_input: bool = False,
              lora_context: Optional["MoELoRAContext"] = None) -> torch.Tensor:
        if lora_context is not None and not self.supports_lora():
            raise RuntimeError(
                f"{type(self.fused_experts).__name__} received a LoRA context but does not support LoRA; "
                "select a LoRA-capable MoE backend")
        experts = self.fused_experts
        mapping = None
        if lora_context is not None:
            mapping = lora_context.punica_wrapper.token_mapping(hidden_states.shape[0])
        prep = self.prepare_finalize.prepare(
            hidden_states, topk_weights, topk_ids, num_experts=global_num_experts, expert_map=expert_map,
            apply_router_weight_on_input=apply_router_weight_on_input, quant_config=experts.quant_config,
            token_lora_mapping=mapping)
        if lora_context is not None and prep.token_lora_mapping is not mapping:
            lora_context = lora_context.after_dispatch(prep.token_lora_mapping)  # the rank's view of the mapping
        M, H = prep.a1q.shape
        top_k = prep.topk_ids.shape[1]
        shapes = experts.workspace_shapes(M, w1.shape[1], H, top_k, w1.shape[0])
        dev = hidden_states.device
        dtype = hidden_states.dtype
        ws13 = self._workspace("workspace13", shapes.workspace13, dtype, dev)
        ws2 = self._workspace("workspace2", shapes.workspace2, dtype, dev)
        output = torch.empty((hidden_states.shape[0], H), dtype=dtype, device=dev)
        reduce = experts.finalize_weight_and_reduce_impl()
        # the experts write the layer's output directly when the finalize would only copy it there
        direct = (self.prepare_finalize.finalizes_in_place and isinstance(reduce, TopKWeightAndReduceNoOP)
                  and tuple(shapes.output) == tuple(output.shape))
        fused_out = output if direct else self._workspace("fused_out", shapes.output, dtype, dev)
        experts.apply(fused_out, prep.a1q, w1, w2, prep.topk_weights, prep.topk_ids, activation=activation,
                      global_num_experts=global_num_experts, expert_map=expert_map, a1q_scale=prep.a1q_scale,
                      workspace13=ws13, workspace2=ws2, apply_router_weight_on_input=apply_router_weight_on_input,
                      lora_context=lora_context)
        self.prepare_finalize.finalize(output, fused_out, prep.topk_weights, prep.topk_ids,
                                       apply_router_weight_on_input=apply_router_weight_on_input,
                                       weight_and_reduce=reduce, handle=prep.handle)
        return output
