"""Loaded adapters (``LoRAModel``) and the module table they are checked against.

An adapter is held on the CPU as one entry per module the model can adapt,
keyed by the model's module name in the adapter's (HF) naming, e.g.
``model.layers.0.self_attn.q_proj`` (the manager later packs q/k/v into the
slices of ``qkv_proj``).  Scaling (lora_alpha / r, or / sqrt(r) for rsLoRA) is
already folded into every B.

The module table (``LoRAModuleSpec`` / ``MoELoRAModuleSpec`` per name) is what
the model manager knows about the model: it is built from the wrapped layers
and handed to the loader, which validates an adapter against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch


@dataclass(frozen=True)
class LoRAModuleSpec:
    """A dense module that can take LoRA: y = x @ W^T with W [out_features, in_features] (full, unsharded)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class MoELoRAModuleSpec:
    """A fused-MoE experts module that can take LoRA (full sizes, all experts).

    num_experts: E (global).  hidden_size: H.  intermediate_size: I (per expert, unsharded).
    gated: w13 has 2I rows (gate then up, or interleaved for gpt-oss); else I rows.
    w13_slices: slices of the LoRA layer's w13 buffers: 2 (gate, up) or 1 (one
        gate_up slice with a shared A; a two-slice adapter then needs rank 2r).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    gated: bool = True
    w13_slices: int = 2

    @property
    def w13_rows(self) -> int:
        return 2 * self.intermediate_size if self.gated else self.intermediate_size


ModuleSpec = Union[LoRAModuleSpec, MoELoRAModuleSpec]


@dataclass
class LoRALayerWeights:
    """One dense module of an adapter.

    lora_a: [rank, in_features];  lora_b: [out_features, rank], scaling folded in.
    """

    module_name: str
    rank: int
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    @property
    def input_dim(self) -> int:
        return self.lora_a.shape[1]

    @property
    def output_dim(self) -> int:
        return self.lora_b.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """B @ A in fp32: [out_features, in_features] (for tests and debugging)."""
        return self.lora_b.float() @ self.lora_a.float()


@dataclass
class MoELoRALayerWeights:
    """One fused-MoE experts module of an adapter, in the format ``FusedMoEWithLoRA.set_lora`` takes.

    E' experts: all of them (global order) when ``expert_ids`` is None, else the experts it
    names (global ids; an expert-parallel rank keeps only its own, ``restricted_to``).
    Scaling folded into every B.
    w13_lora_a: [A_gate, A_up] each [E', r, H] (per-expert adapters), or [A_gate_up] [E', r, H] (fused).
    w13_lora_b: [B_gate, B_up] each [E', I, r], or [B_gate_up] [E', w13_rows, r] (w13_weight's row order).
    w2_lora_a: [E', r2, I];  w2_lora_b: [E', H, r2].
    rank: the largest of r and r2 (a part the adapter did not target is zeros).
    """

    module_name: str
    rank: int
    w13_lora_a: list[torch.Tensor]
    w13_lora_b: list[torch.Tensor]
    w2_lora_a: torch.Tensor
    w2_lora_b: torch.Tensor
    expert_ids: Optional[tuple[int, ...]] = None

    @property
    def num_experts(self) -> int:
        """Experts held (E', not the model's E once restricted)."""
        return self.w2_lora_a.shape[0]

    def restricted_to(self, expert_ids: Sequence[int]) -> "MoELoRALayerWeights":
        """A copy holding only ``expert_ids`` (global ids, in that order): the other experts' A and B
        are not referenced any more, so their memory is freed with the full adapter."""
        held = list(range(self.num_experts)) if self.expert_ids is None else list(self.expert_ids)
        position = {g: i for i, g in enumerate(held)}
        missing = [int(e) for e in expert_ids if int(e) not in position]
        if missing:
            raise ValueError(f"{self.module_name}: the adapter holds no weights for experts {missing[:16]}")
        rows = torch.tensor([position[int(e)] for e in expert_ids], dtype=torch.long)
        pick = lambda t: t.index_select(0, rows).contiguous()  # noqa: E731
        return MoELoRALayerWeights(self.module_name, self.rank, [pick(t) for t in self.w13_lora_a],
                                   [pick(t) for t in self.w13_lora_b], pick(self.w2_lora_a),
                                   pick(self.w2_lora_b), tuple(int(e) for e in expert_ids))

    def set_lora_kwargs(self) -> dict:
        """Keyword arguments of ``FusedMoEWithLoRA.set_lora``."""
        return dict(w13_lora_a=self.w13_lora_a, w13_lora_b=self.w13_lora_b, w2_lora_a=self.w2_lora_a,
                    w2_lora_b=self.w2_lora_b, expert_ids=self.expert_ids)

    def w13_delta(self) -> torch.Tensor:
        """fp32 [E, w13_rows, H]: the delta of every expert's w13 (slices stacked in row order)."""
        parts = [torch.bmm(b.float(), a.float()) for a, b in zip(self.w13_lora_a, self.w13_lora_b)]
        return torch.cat(parts, dim=1)

    def w2_delta(self) -> torch.Tensor:
        """fp32 [E, H, I]."""
        return torch.bmm(self.w2_lora_b.float(), self.w2_lora_a.float())


LayerWeights = Union[LoRALayerWeights, MoELoRALayerWeights]


@dataclass
class LoRAModel:
    """A loaded adapter: its id and, per model module name, its weights (CPU tensors).

    rank: the largest rank of any module (what must fit ``max_lora_rank``).
    """

    lora_int_id: int
    rank: int
    loras: dict[str, LayerWeights] = field(default_factory=dict)
    name: str = ""
    path: str = ""

    def get_lora(self, module_name: str) -> Optional[LayerWeights]:
        return self.loras.get(module_name)

    def num_bytes(self) -> int:
        total = 0
        for w in self.loras.values():
            ts = [w.lora_a, w.lora_b] if isinstance(w, LoRALayerWeights) else [
                *w.w13_lora_a, *w.w13_lora_b, w.w2_lora_a, w.w2_lora_b]
            total += sum(t.numel() * t.element_size() for t in ts)
        return total
