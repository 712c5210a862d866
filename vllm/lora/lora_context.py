"""``MoELoRAContext``: everything a fused-MoE forward needs to add LoRA deltas.

Built in ``FusedMoEWithLoRA.set_mapping`` (and again only when the kernel rank of
w13 or w2 changes: its ``*_stacked`` tensors are views cut to it), and set on the wrapped
``FusedMoE`` layer (``layer.set_lora_context``).  From there it travels as an
explicit ``lora_context=`` keyword argument:

    FusedMoE.forward -> MoERunner -> quant_method.apply -> FusedMoEModularMethod.apply
      -> FusedMoEKernel.apply -> fused_experts.apply -> apply_w13_lora / apply_w2_lora
      -> PunicaWrapper.add_lora_w13 / add_lora_w2 (ctx as an argument: they read its fields)

This dataclass is the one list of those fields: a new one is declared here, set where
the context is built and read where it is used; nothing in between names it.

It holds *references* to buffers that are updated in place (adapter weights are
copied into their slots by ``set_lora``; the token-to-adapter mapping lives in
the Punica wrapper and is refreshed every step), so it stays valid across
batches, adapter loads and unloads, and CUDA-graph replays.  It is the only LoRA
surface the MoE code sees: no hidden state, no patched methods.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Optional

import torch

if TYPE_CHECKING:
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase


@dataclass(frozen=True, eq=False)
class MoELoRAContext:
    """LoRA state of one fused-MoE layer.

    Shapes use L = max_loras, E = local_num_experts, R = the op's kernel rank (the
    largest rank of the adapters in the layer's slots rounded up, at most max_lora_rank;
    smaller adapters are stored zero-padded), H = hidden size, I_part = this TP
    rank's share of the per-expert intermediate size.

    w13_lora_a_stacked: tuple of ``w13_num_slices`` tensors, each [L, E, R_a, H]
        in the activation dtype.  Slice 0 is gate (or the fused gate_up), slice 1
        is up.  R_a = R, or R / tp_size when ``fully_sharded``.
    w13_lora_b_stacked: tuple of ``w13_num_slices`` tensors, each [L, E, N_s, R];
        N_s = I_part for two slices, 2*I_part (in w13_weight's row order) for one.
    w2_lora_a_stacked: 1-tuple, [L, E, R, I_part].
    w2_lora_b_stacked: 1-tuple, [L, E, H_b, R]; H_b = H, or H / tp_size when
        ``fully_sharded`` (rows written at offset H_b * tp_rank).
    adapter_enabled: [L + 1] int32; entry s != 0 when slot s holds an adapter.
        The last entry is always 0, so a token with no adapter (slot -1) reads
        "disabled".  A slot whose adapter was removed reads 0 and adds exactly
        nothing.
    enabled_slots: the same on the host, the wrapper's live set (None = not tracked);
        with the wrapper's step mapping it lets the seams skip a step where no
        token uses an adapter of this layer (``PunicaWrapperBase.any_active``).
    max_loras: L.
    top_k: experts per token of this layer.
    w13_num_slices: 2 (gate, up: per-projection adapters) or 1 (a fused gate_up
        adapter, or a non-gated MoE).
    fully_sharded: S-LoRA style sharding of the rank dimension (FACTS.md 2).
    tp_rank, tp_size: this rank's position in the tensor-parallel group.
    local_num_experts: E.
    punica_wrapper: owns the per-step token-to-adapter mapping and the kernels
        (``add_lora_w13`` / ``add_lora_w2``).
    use_tuned_config: look up tuned kernel tiles (VLLM_TUNED_CONFIG_FOLDER or the
        shipped ones) before the heuristic.
    token_lora_mapping: the rank's view of the token-to-slot mapping after an
        expert-parallel dispatch moved tokens between ranks: [M'] int32, one slot per
        dispatched row (-1 = no adapter).  None (the context as built): no row moved,
        the Punica wrapper's step mapping applies.  Set per forward by
        ``FusedMoEKernel.apply`` through ``after_dispatch``, never stored on the layer.
    """

    w13_lora_a_stacked: tuple[torch.Tensor, ...]
    w13_lora_b_stacked: tuple[torch.Tensor, ...]
    w2_lora_a_stacked: tuple[torch.Tensor, ...]
    w2_lora_b_stacked: tuple[torch.Tensor, ...]
    adapter_enabled: torch.Tensor
    enabled_slots: Optional[AbstractSet[int]]
    max_loras: int
    top_k: int
    w13_num_slices: int
    fully_sharded: bool
    tp_rank: int
    tp_size: int
    local_num_experts: int
    punica_wrapper: "PunicaWrapperBase"
    use_tuned_config: bool = False
    token_lora_mapping: Optional[torch.Tensor] = None

    def after_dispatch(self, token_lora_mapping: Optional[torch.Tensor]) -> "MoELoRAContext":
        """A copy for one forward whose rows are the dispatched ones, mapped by ``token_lora_mapping``."""
        return dataclasses.replace(self, token_lora_mapping=token_lora_mapping)

    def __post_init__(self) -> None:
        if len(self.w13_lora_a_stacked) != self.w13_num_slices or len(self.w13_lora_b_stacked) != self.w13_num_slices:
            raise ValueError(
                f"w13 LoRA buffers have {len(self.w13_lora_a_stacked)}/{len(self.w13_lora_b_stacked)} slices, "
                f"expected w13_num_slices={self.w13_num_slices}"
            )
        if self.adapter_enabled.numel() != self.max_loras + 1:
            raise ValueError(f"adapter_enabled has {self.adapter_enabled.numel()} entries, expected max_loras + 1")
