"""LoRA for fused-MoE layers.

``FusedMoEWithLoRA`` wraps a ``FusedMoE`` whose experts support LoRA.  It owns
the stacked adapter buffers (see ``MoELoRAContext`` for shapes), fills and
clears slots, and in ``set_mapping`` builds the ``MoELoRAContext`` once and
sets it on the base layer (``FusedMoE.set_lora_context``).  The base layer must be
finalised (``process_weights_after_loading``) before it is wrapped.  The base layer's forward passes the context down
as an argument; nothing in the MoE code is patched.

Two flavours, by how w13 LoRA is laid out:
- ``FusedMoEWithLoRA``: two slices, gate and up, each with its own A (the
  per-expert adapter layout: ``experts.{e}.gate_proj`` / ``up_proj``).
- ``FusedMoE3DWithLoRA``: one slice over all 2I rows of w13 with one shared A
  (peft's fused-expert adapters, ``target_parameters``; required for gpt-oss,
  whose gate/up rows are interleaved).
Each accepts the other's layout in ``set_lora`` and converts it (a fused A is
shared by both slices; two slices become one of rank 2r with a block-diagonal B).

TP slicing (FACTS.md 2): w13 A replicated (fully sharded: this rank's R/tp rows
of the zero-padded A), w13 B sharded on output rows like w13_weight; w2 A
sharded on input columns like w2_weight; w2 B replicated (fully sharded: H/tp
rows, written at offset H/tp * tp_rank).

Shared w13 A (``SHARE_W13_A``): a fused gate_up adapter (peft's ``target_parameters``) in the two-slice
layout has one A for both slices, stored twice.  While every slot's adapter has equal gate and up A
(empty slots count), both slices of ``w13_lora_a_stacked`` are views of the first slice's buffer: the
kernels then read one A (the sorted kernel and the two-launch ones shrink once for all slices; the per-pair
kernels run a pair's slices side by side and find it in L2).  A change of this state rebuilds the context and tells the
Punica wrapper, as a kernel rank change does (graphs bake the A pointer in).

Kernel rank (``effective_rank.py``): w13 and w2 each keep the rank of every slot's adapter; the
context's ``*_stacked`` tensors are views of the buffers cut to each op's kernel rank, and the
context is built again (and the Punica wrapper told) when one changes.  Fully sharded LoRA keeps
R (its A rows are split over the ranks at R's layout).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from vllm.config.lora import LoRAConfig
from vllm.lora.layers.base import BaseLayerWithLoRA
from vllm.lora.layers.effective_rank import SlotRanks
from vllm.lora.lora_context import MoELoRAContext
from vllm.model_executor.layers.fused_moe.config import MoEActivation
from vllm.model_executor.layers.fused_moe.layer import FusedMoE

#: the w13 slices of a two-slice layer read one A while every slot's gate and up A are equal (module docstring)
SHARE_W13_A = True


class FusedMoEWithLoRA(BaseLayerWithLoRA):
    w13_num_slices_default = 2

    def __init__(self, base_layer: FusedMoE) -> None:
        """Wrap a finalised ``base_layer`` (``process_weights_after_loading`` done: its backend is
        known only then); the constructor checks, it changes nothing in the base layer."""
        super().__init__()
        if not base_layer.is_finalized:
            raise RuntimeError(
                f"MoE layer {base_layer.prefix or '<unnamed>'} is not finalised, so its experts backend is not "
                "chosen yet: call its process_weights_after_loading() once its weights are loaded (get_model "
                "does), then wrap it for LoRA")
        experts = type(base_layer.experts)
        if not experts.supports_lora():
            raise ValueError(
                f"MoE layer {base_layer.prefix or '<unnamed>'} runs {experts.__name__}, which does not support "
                f"LoRA ({experts.lora_unsupported_reason()}). Build the layer with lora_enabled=True so the "
                "backend selection picks a LoRA-capable backend, or choose one explicitly (triton or torch).")
        self.base_layer = base_layer
        cfg = base_layer.moe_config
        self.tp_size = cfg.parallel_config.tp_size
        self.tp_rank = cfg.parallel_config.tp_rank
        self.w13_num_slices = self._num_slices(cfg.activation)
        self.punica_wrapper = None

    @classmethod
    def _num_slices(cls, activation: MoEActivation) -> int:
        if activation is MoEActivation.SWIGLUOAI:
            raise ValueError("gpt-oss experts interleave gate/up rows: wrap them with FusedMoE3DWithLoRA")
        return 2 if activation.is_gated else 1

    # ---- buffers -----------------------------------------------------------------
    def create_lora_weights(self, max_loras: int, lora_config: LoRAConfig, model_config: Any = None) -> None:
        base = self.base_layer
        R = lora_config.max_lora_rank
        self.max_loras = max_loras
        self.max_lora_rank = R
        self.fully_sharded = lora_config.fully_sharded_loras and self.tp_size > 1
        self.use_tuned_config = lora_config.use_tuned_config
        if self.fully_sharded and (R % self.tp_size or base.hidden_size % self.tp_size):
            raise ValueError(f"fully sharded LoRA needs max_lora_rank ({R}) and hidden size ({base.hidden_size}) "
                             f"divisible by tp_size ({self.tp_size})")
        dtype = lora_config.lora_dtype or base.moe_config.in_dtype  # w13_weight may hold quantized codes
        dev = base.w13_weight.device
        L, E, H, S = max_loras, base.local_num_experts, base.hidden_size, self.w13_num_slices
        I_part = base.intermediate_size_per_partition
        n_slice = base.moe_config.w13_out_dim // S
        r_a = R // self.tp_size if self.fully_sharded else R
        h_b = H // self.tp_size if self.fully_sharded else H
        # One allocation per weight; the per-slice tensors are views of it, so the
        # kernels can cover all slices in one launch.
        self._w13_a = torch.zeros(S, L, E, r_a, H, dtype=dtype, device=dev)
        self._w13_b = torch.zeros(S, L, E, n_slice, R, dtype=dtype, device=dev)
        self._w2_a = torch.zeros(1, L, E, R, I_part, dtype=dtype, device=dev)
        self._w2_b = torch.zeros(1, L, E, h_b, R, dtype=dtype, device=dev)
        # fully sharded: the rank is not cut (A's rows are split over the TP ranks at R's layout)
        self.w13_ranks, self.w2_ranks = SlotRanks(L, R), SlotRanks(L, R)
        self.kernel_ranks = (-1, -1)  # (w13, w2)
        self.w13_a_same = [True] * L  # per slot: its gate and up A are equal (an empty slot's are zeros)
        self.w13_a_shared = False  # w13_lora_a_stacked's slices are views of one buffer
        self.adapter_enabled = torch.zeros(L + 1, dtype=torch.int32, device=dev)
        self.enabled_slots: set[int] = set()  # host mirror of adapter_enabled (shared with the context)
        self._cut_to_rank()

    @property
    def effective_ranks(self) -> tuple[int, int]:
        """(w13, w2): the largest rank among the adapters in this layer's slots, per op (0 when none)."""
        return self.w13_ranks.effective, self.w2_ranks.effective

    def _cut_to_rank(self) -> None:
        """Point the ``*_stacked`` tensors at the buffers cut to each op's kernel rank (strided views, no copy)
        when one changed; then build the context again and tell the Punica wrapper (graphs bake the rank in)."""
        R = self.max_lora_rank
        r13, r2 = (R, R) if self.fully_sharded else (self.w13_ranks.kernel, self.w2_ranks.kernel)
        shared = SHARE_W13_A and self.w13_num_slices > 1 and all(self.w13_a_same)
        if (r13, r2) == self.kernel_ranks and shared == self.w13_a_shared:
            return
        changed = self.kernel_ranks != (-1, -1)
        self.kernel_ranks, self.w13_a_shared = (r13, r2), shared
        r13_a = self._w13_a.shape[3] if self.fully_sharded else r13
        w13_a = self._w13_a[:, :, :, :r13_a]
        self.w13_lora_a_stacked = (w13_a[0],) * self.w13_num_slices if shared else tuple(w13_a.unbind(0))
        self.w13_lora_b_stacked = tuple(self._w13_b[..., :r13].unbind(0))
        self.w2_lora_a_stacked = tuple(self._w2_a[:, :, :, :r2].unbind(0))
        self.w2_lora_b_stacked = tuple(self._w2_b[..., :r2].unbind(0))
        if changed and self.punica_wrapper is not None:
            self.set_mapping(self.punica_wrapper)
            self.punica_wrapper.lora_ranks_changed()

    def reset_lora(self, index: int) -> None:
        self._check_index(index)
        self._clear_slot(index)
        self._cut_to_rank()

    def _clear_slot(self, index: int) -> None:
        for buf in (self._w13_a, self._w13_b, self._w2_a, self._w2_b):
            buf[:, index].zero_()
        self.adapter_enabled[index] = 0
        self.enabled_slots.discard(index)
        self.w13_ranks.set(index, 0)
        self.w2_ranks.set(index, 0)
        self.w13_a_same[index] = True

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.max_loras:
            raise IndexError(f"LoRA slot {index} out of range [0, {self.max_loras})")

    # ---- filling a slot ------------------------------------------------------------
    def local_expert_ids(self) -> list[int]:
        """Global ids of this rank's experts, in local order (all experts without expert parallelism)."""
        base = self.base_layer
        if base.expert_map is None:
            return list(range(base.global_num_experts))
        emap = base.expert_map.cpu().tolist()
        return sorted((e for e in range(base.global_num_experts) if emap[e] >= 0), key=lambda e: emap[e])

    def set_lora(self, index: int, *, w13_lora_a: Sequence[torch.Tensor], w13_lora_b: Sequence[torch.Tensor],
                 w2_lora_a: torch.Tensor, w2_lora_b: torch.Tensor,
                 expert_ids: Optional[Sequence[int]] = None) -> None:
        """Copy one adapter (scaling folded into B) into slot ``index``.

        The tensors hold E' experts: all E (global order) when ``expert_ids`` is None, else
        the experts ``expert_ids`` names (global ids, e.g. an adapter sliced to this rank's
        experts at load); every local expert must be among them.
        w13_lora_a: [A_gate, A_up] each [E', r, H], or [A_gate_up] [E', r, H].
        w13_lora_b: [B_gate, B_up] each [E', I, r], or [B_gate_up] [E', w13_rows, r]
            (rows in w13_weight's order: gate then up, or interleaved for gpt-oss).
        w2_lora_a: [E', r, I];  w2_lora_b: [E', H, r].
        """
        self._check_index(index)
        base = self.base_layer
        E, H = base.global_num_experts, base.hidden_size
        given = list(range(E)) if expert_ids is None else [int(e) for e in expert_ids]
        I_full = base.moe_config.intermediate_size
        w13_a, w13_b = self._to_own_layout(list(w13_lora_a), list(w13_lora_b), len(given))
        r = w2_lora_a.shape[1]
        self._check_shape("w2_lora_a", w2_lora_a, (len(given), r, I_full))
        self._check_shape("w2_lora_b", w2_lora_b, (len(given), H, r))
        position = {g: i for i, g in enumerate(given)}
        glob = self.local_expert_ids()
        missing = [g for g in glob if g not in position]
        if missing:
            raise ValueError(f"the adapter was given for experts {given[:16]}{'...' if len(given) > 16 else ''}, "
                             f"which lacks this rank's experts {missing[:16]}")
        loc = list(range(len(glob))) if base.expert_map is None else [int(base.expert_map[g]) for g in glob]
        r13 = w13_a[0].shape[1]
        if max(r13, r) > self.max_lora_rank:
            raise ValueError(f"adapter rank {max(r13, r)} exceeds max_lora_rank={self.max_lora_rank}; "
                             "restart with a larger --max-lora-rank")
        self._clear_slot(index)  # the old adapter's columns past the new one's rank become zero
        rows = torch.tensor([position[g] for g in glob], dtype=torch.long)
        dst_e = torch.tensor(loc, dtype=torch.long)
        for s in range(self.w13_num_slices):
            a = self._pad_rank(w13_a[s][rows])  # [E_local, R, H]
            if self.fully_sharded:
                a = a[:, self._rank_shard(self.max_lora_rank)]
            self._put(self._w13_a[s, index], dst_e, a)
            b = torch.stack([self._shard_w13_rows(w13_b[s][int(e)]) for e in rows])
            self._put(self._w13_b[s, index], dst_e, self._pad_rank(b, dim=2))
        i_cols = base.tp_slice(I_full)
        self._put(self._w2_a[0, index], dst_e, self._pad_rank(w2_lora_a[rows][:, :, i_cols]))
        b2 = self._pad_rank(w2_lora_b[rows], dim=2)
        if self.fully_sharded:
            b2 = b2[:, self._rank_shard(H)]
        self._put(self._w2_b[0, index], dst_e, b2)
        self.adapter_enabled[index] = 1
        self.enabled_slots.add(index)
        self.w13_ranks.set(index, r13)
        self.w2_ranks.set(index, r)
        self.w13_a_same[index] = len(w13_a) == 1 or all(w13_a[0] is t or torch.equal(w13_a[0], t) for t in w13_a)
        self._cut_to_rank()

    @staticmethod
    def _put(dst: torch.Tensor, experts: torch.Tensor, src: torch.Tensor) -> None:
        if not torch.isfinite(src).all():
            raise ValueError("LoRA weights contain NaN or Inf")
        dst.index_copy_(0, experts.to(dst.device), src.to(device=dst.device, dtype=dst.dtype))

    def _shard_w13_rows(self, b: torch.Tensor) -> torch.Tensor:
        if self.w13_num_slices == 1:
            return self.base_layer.shard_w13(b)
        return b[self.base_layer.tp_slice(b.shape[0])]

    def _rank_shard(self, full: int) -> slice:
        part = full // self.tp_size
        return slice(self.tp_rank * part, (self.tp_rank + 1) * part)

    def _pad_rank(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Zero-pad the rank dimension to max_lora_rank (zeros at the end, before any sharding)."""
        r = t.shape[dim]
        if r > self.max_lora_rank:
            raise ValueError(f"adapter rank {r} exceeds max_lora_rank={self.max_lora_rank}; "
                             "restart with a larger --max-lora-rank")
        if r == self.max_lora_rank:
            return t
        pad = list(t.shape)
        pad[dim] = self.max_lora_rank - r
        return torch.cat([t, t.new_zeros(pad)], dim=dim)

    @staticmethod
    def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(want)} for this MoE layer")

    def _to_own_layout(self, a: list[torch.Tensor], b: list[torch.Tensor], E: int) -> tuple[list, list]:
        base = self.base_layer
        H, I_full = base.hidden_size, base.moe_config.intermediate_size
        if len(a) != len(b) or len(a) not in (1, 2):
            raise ValueError("w13 LoRA must be given as [gate, up] or as one fused gate_up (A and B alike)")
        r = a[0].shape[1]
        for x in a:
            self._check_shape("w13_lora_a", x, (E, r, H))
        if len(a) == 2:
            if not base.activation.is_gated:
                raise ValueError("a non-gated MoE has no gate/up pair: give w13 LoRA as one tensor")
            for x in b:
                self._check_shape("w13_lora_b", x, (E, I_full, r))
        else:
            self._check_shape("w13_lora_b", b[0], (E, base.moe_config.w13_out_dim * self.tp_size, r))
        if len(a) == self.w13_num_slices:
            return a, b
        if self.w13_num_slices == 2:  # fused adapter into two slices: A shared, B split
            return [a[0], a[0]], [b[0][:, :I_full], b[0][:, I_full:]]
        # two slices into one: rank 2r, block-diagonal B, its rows in w13's order (gpt-oss: interleaved)
        zeros = b[0].new_zeros(b[0].shape)
        gate, up = torch.cat([b[0], zeros], 2), torch.cat([zeros, b[1]], 2)  # [E, I, 2r] each
        if base.activation is MoEActivation.SWIGLUOAI:
            return [torch.cat(a, dim=1)], [torch.stack([gate, up], dim=2).reshape(E, 2 * I_full, -1)]
        return [torch.cat(a, dim=1)], [torch.cat([gate, up], 1)]

    # ---- mapping and forward --------------------------------------------------------
    def set_mapping(self, punica_wrapper: Any) -> None:
        """Attach the Punica wrapper and build the context once; it stays valid afterwards."""
        self.punica_wrapper = punica_wrapper
        base = self.base_layer
        base.set_lora_context(MoELoRAContext(
            w13_lora_a_stacked=self.w13_lora_a_stacked, w13_lora_b_stacked=self.w13_lora_b_stacked,
            w2_lora_a_stacked=self.w2_lora_a_stacked, w2_lora_b_stacked=self.w2_lora_b_stacked,
            adapter_enabled=self.adapter_enabled, enabled_slots=self.enabled_slots, max_loras=self.max_loras,
            top_k=base.top_k,
            w13_num_slices=self.w13_num_slices, fully_sharded=self.fully_sharded, tp_rank=self.tp_rank,
            tp_size=self.tp_size, local_num_experts=base.local_num_experts, punica_wrapper=punica_wrapper,
            use_tuned_config=self.use_tuned_config))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden_states, router_logits)

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig,
                          packed_modules_list: Optional[list] = None, model_config: Any = None) -> bool:
        return type(source_layer) is FusedMoE and source_layer.activation is not MoEActivation.SWIGLUOAI


class FusedMoE3DWithLoRA(FusedMoEWithLoRA):
    """One w13 slice over all rows with a shared A: fused-expert adapters and gpt-oss."""

    @classmethod
    def _num_slices(cls, activation: MoEActivation) -> int:
        return 1

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig,
                          packed_modules_list: Optional[list] = None, model_config: Any = None) -> bool:
        if type(source_layer) is not FusedMoE:
            return False
        fused_adapters = bool(packed_modules_list) and list(packed_modules_list) == ["experts"]
        return source_layer.activation is MoEActivation.SWIGLUOAI or fused_adapters
