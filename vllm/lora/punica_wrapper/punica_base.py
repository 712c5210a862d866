"""The Punica wrapper: per-step token-to-adapter mapping and the LoRA compute.

One wrapper serves every LoRA layer of a model.  ``update_metadata`` is called
once per step with the slot of each token; every layer then reads the same
mapping (FACTS.md 4: build it once per step, not once per layer).

For fused MoE the wrapper offers the two seams the experts call inline:

    add_lora_w13(y, x, ctx, ...)  after GEMM1, before the activation:
        y[p, cols of slice s] += (x[token(p)] @ A_s[slot, e]^T) @ B_s[slot, e]^T
    add_lora_w2(y, x, ctx, ...)   after GEMM2, before the top-k sum:
        y[p, :] += w_p * (x[p] @ A[slot, e]^T) @ B[slot, e]^T
        (w_p = router weight exactly when the base GEMM2 output was weighted)

``ctx`` is the layer's ``MoELoRAContext``: its adapter buffers and settings are read
from it, so a new LoRA field is added to the dataclass and read where it is used.
``add_lora_w13`` returns the routing it prepared (a ``MoELoRARouting``) so
``add_lora_w2`` reuses it instead of sorting again.  Subclasses supply the
compute (``_fused``, ``_shrink``, ``_expand``, ``_align``): Triton on GPU, torch on CPU.

For the linear layers (``vllm.lora.layers.linear``) the wrapper offers
``add_lora_linear(y, x, ...)``: y[t, cols of slice s] += (x[t] @ A_s[slot]^T) @ B_s[slot]^T,
computed by the subclass's ``_add_lora_linear`` from the same per-step mapping.

Which layers launch: eagerly, a layer launches its LoRA ops when some token of the step uses a
slot where it holds weights (``any_active``).  A CUDA graph cannot take that per-step decision,
so a LoRA graph is captured under ``run_all_lora_ops`` with every layer of the *LoRA layer set*
(``lora_layer_set``): the layers that held weights in some slot since the wrapper was made.
Policy: the set only grows (the union of the layers targeted by every adapter ever activated
into a slot, ``add_lora_layers``), so swapping or unloading adapters with the same targets never
changes it, and a layer of the set whose slots hold no weights for a step adds exactly zero.
Its ``version`` changes when the set does, and when a layer's kernel rank changes
(``lora_ranks_changed``: the LoRA kernels run at the rank of the adapters in the layer's slots,
``vllm.lora.layers.effective_rank``, and a graph bakes that rank in); version 0 (no adapter activated
yet) means "unknown": every layer counts as a member, which is what a graph captured at start-up holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable, Optional, Protocol, Sequence

import torch

from vllm.lora.ops.slices import slice_offsets
from vllm.lora.punica_wrapper.step_mapping import StepMapping

if TYPE_CHECKING:
    from vllm.lora.lora_context import MoELoRAContext
    from vllm.kernel_configs.tile_config import MoELoRATileConfig
    from vllm.lora.ops.moe_lora_align import MoELoRAAlignment, MoELoRAAlignPlan


class TPGroup(Protocol):
    """The collectives the fully-sharded LoRA path needs (torch.distributed or a test fake)."""

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor: ...

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MoELoRARouting:
    """What add_lora_w13 prepared and add_lora_w2 reuses.

    alignment: a ``MoELoRAAlignment`` (sorted path) or None (small-batch path).
    token_lora_mapping: [M] int32 view of the step's mapping, -1 = no adapter.
    """

    alignment: Optional[Any]
    token_lora_mapping: torch.Tensor
    num_pairs: int


@dataclass(frozen=True)
class LoRALayerSet:
    """A snapshot of the LoRA layer set (see the module docstring).

    A layer is named by its ``enabled_slots`` (the host set of the slots where it holds weights:
    one object per layer, shared with its ``MoELoRAContext``); ``members`` holds their ids.
    version: 0 while no adapter was activated into a slot; then +1 at every change (of the members, or of
        some layer's kernel rank).
    members: None while unknown (every layer counts as a member): at version 0, or when only kernel
        ranks changed before the first ``add_lora_layers``.
    """

    version: int
    members: Optional[frozenset[int]]

    def __contains__(self, enabled_slots: object) -> bool:
        return self.members is None or id(enabled_slots) in self.members



def _without(kw: dict, key: str) -> dict:
    return {k: v for k, v in kw.items() if k != key}


class PunicaWrapperBase(StepMapping, ABC):
    """Holds the step's token-to-adapter mapping and launches the LoRA ops."""

    def __init__(self, max_num_batched_tokens: int, max_loras: int, device: torch.device | str,
                 tp_group: Optional[TPGroup] = None) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.device = torch.device(device)
        self.tp_group = tp_group
        self._init_step_mapping(max_num_batched_tokens)  # the mapping buffer and the step's active slots
        self._run_all = False  # see run_all_lora_ops
        self._run_all_layers: Optional[LoRALayerSet] = None  # the layer set a graph being captured holds
        # The LoRA layer set: id -> the layer's enabled_slots (held, so that no other object takes its id).
        self._layer_slots: dict[int, Collection[int]] = {}
        self._layer_set = LoRALayerSet(0, None)

    # ---- which layers launch ------------------------------------------------
    def any_active(self, enabled_slots: Optional[Collection[int]]) -> bool:
        """Whether this layer launches its LoRA ops in this step.  ``enabled_slots``: the slots where the
        layer holds weights (None = not tracked: always launch).  Eagerly: whether some token of the step
        uses one of them, so a batch of base-model requests, or adapters that do not target the layer, cost
        nothing there.  Under ``run_all_lora_ops`` (a CUDA graph being captured, which cannot decide per
        step; or its emulated replay): whether the layer is in the LoRA layer set the graph holds.
        """
        if self._run_all:
            return enabled_slots is None or enabled_slots in (self._run_all_layers or self._layer_set)
        if enabled_slots is None or self._active_slots is None:
            return True
        return not self._active_slots.isdisjoint(enabled_slots)

    def step_includes_layer(self, enabled_slots: Optional[Collection[int]]) -> bool:
        """Whether a layer's forward takes its LoRA path this step whatever slots its tokens use: some
        token of the step has an adapter (of any layer) and the layer is in the LoRA layer set.  Under
        ``run_all_lora_ops``: ``any_active``.  The dense layers' fused projection + LoRA decides with it,
        so that an eager step takes the kernels a graph replay of it would."""
        if self._run_all:
            return self.any_active(enabled_slots)
        if self._active_slots is not None and not self._active_slots:
            return False
        return enabled_slots is None or enabled_slots in self._layer_set

    def run_all_lora_ops(self, enabled: bool, layer_set: Optional[LoRALayerSet] = None) -> None:
        """While enabled, ``any_active`` is True for every layer of ``layer_set`` (default: the current
        LoRA layer set), whatever the mapping (slots without weights add exactly zero).  CUDA-graph capture
        of steps with adapters uses this, so the graph does not depend on which adapters the captured batch
        happened to use; the graph is valid while ``lora_layer_set.version`` stays ``layer_set``'s."""
        self._run_all = bool(enabled)
        self._run_all_layers = layer_set if enabled else None

    @property
    def lora_layer_set(self) -> LoRALayerSet:
        """The current LoRA layer set (an immutable snapshot)."""
        return self._layer_set

    def add_lora_layers(self, layers: Iterable[Collection[int]]) -> bool:
        """Record that ``layers`` (their ``enabled_slots``) hold weights in a slot: called by the LoRA
        manager whenever it activates an adapter into a slot, with the layers that adapter targets (maybe
        none).  The first call makes the set known; a new member changes the version.  True if it changed."""
        new = [s for s in layers if id(s) not in self._layer_slots]
        if not new and self._layer_set.members is not None:
            return False
        for s in new:
            self._layer_slots[id(s)] = s
        self._layer_set = LoRALayerSet(self._layer_set.version + 1, frozenset(self._layer_slots))
        return True

    def lora_ranks_changed(self) -> None:
        """Record that some layer's kernel rank changed (its LoRA buffers are now read through views of
        another rank): a graph captured before launches the old rank, so the layer set's version changes and
        the LoRA graphs are captured again before their next replay.  The members stay as they are."""
        self._layer_set = LoRALayerSet(self._layer_set.version + 1, self._layer_set.members)

    @property
    def token_lora_indices(self) -> torch.Tensor:
        """[num_tokens] int32 view of the current step's mapping."""
        return self._token_lora_indices[: self._num_tokens]

    def token_mapping(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens] int32 slot of each row of a forward of ``num_tokens`` rows (-1 past the mapped ones)."""
        return self._mapping_for(num_tokens)

    def linear_metadata(self, num_tokens: int) -> Optional[Any]:
        """The step's tokens grouped by slot (a ``LoRALinearMetadata``) for a forward of ``num_tokens`` rows,
        or None where this wrapper keeps none or it does not describe those rows (fewer rows than tokens)."""
        del num_tokens
        return None

    def _mapping_for(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens={self.max_num_batched_tokens}")
        # Rows past the mapped ones (e.g. CUDA-graph padding) read -1: base model only.
        return self._token_lora_indices[:num_tokens]

    # ---- compute, supplied by subclasses ----------------------------------
    @abstractmethod
    def _align(self, topk_ids: torch.Tensor, mapping: torch.Tensor, *, num_experts: int, max_loras: int,
               adapter_enabled: torch.Tensor, expert_map: Optional[torch.Tensor],
               config: Optional["MoELoRATileConfig"]) -> Any: ...

    @abstractmethod
    def _use_small_batch(self, num_pairs: int, num_experts: int, max_loras: int, rank: int) -> bool: ...

    @abstractmethod
    def _config(self, op: str, *, num_pairs: int, num_experts: int, max_loras: int, rank: int, K: int, N: int,
                num_slices: int, dtype: torch.dtype, use_tuned_config: bool,
                small_batch: Optional[bool] = None) -> Optional["MoELoRATileConfig"]:
        """The tile config of one MoE LoRA launch, or None when the compute takes none (torch);
        ``small_batch``: the path the launch takes, when decided (None: by this op's shape)."""

    @abstractmethod
    def _fused(self, out, x, lora_a, lora_b, **kw) -> None: ...

    @abstractmethod
    def _shrink(self, x, lora_a, **kw) -> torch.Tensor: ...

    @abstractmethod
    def _expand(self, out, shrunk, lora_b, **kw) -> None: ...

    # ---- the MoE seams ------------------------------------------------------
    def _w13_mapping(self, ctx: "MoELoRAContext", M: int) -> torch.Tensor:
        """The slot of each of the M rows of a MoE forward (see ``add_lora_w13``)."""
        if ctx.token_lora_mapping is None:
            return self._mapping_for(M)
        if ctx.token_lora_mapping.shape[0] < M:
            raise ValueError(f"token_lora_mapping has {ctx.token_lora_mapping.shape[0]} entries for {M} rows")
        return ctx.token_lora_mapping

    def _small_batch(self, ctx: "MoELoRAContext", num_pairs: int) -> bool:
        """The layer's LoRA path (w13 and w2 take the same one): the per-pair kernels, without the (adapter,
        expert) alignment, or the sorted path; decided at the larger of the two ops' kernel ranks."""
        rank = max(ctx.w13_lora_a_stacked[0].shape[2], ctx.w2_lora_a_stacked[0].shape[2])
        return self._use_small_batch(num_pairs, ctx.local_num_experts, ctx.max_loras, rank)

    def moe_lora_per_pair(self, ctx: "MoELoRAContext", num_pairs: int) -> bool:
        """Whether this layer's LoRA of ``num_pairs`` pairs takes the per-pair kernels (no (adapter, expert)
        alignment; their delta is a sum added once to each output element, so it can go to a buffer of its own
        and join later with the same bits: ``experts/lora_overlap.py``)."""
        return num_pairs > 0 and self._small_batch(ctx, num_pairs)

    def _w13_config(self, ctx: "MoELoRAContext", x: torch.Tensor) -> Optional["MoELoRATileConfig"]:
        lora_a, lora_b = ctx.w13_lora_a_stacked, ctx.w13_lora_b_stacked
        num_pairs = x.shape[0] * ctx.top_k
        return self._config("fused_moe_lora_w13", num_pairs=num_pairs,
                            num_experts=ctx.local_num_experts, max_loras=ctx.max_loras, rank=lora_a[0].shape[2],
                            K=x.shape[1], N=lora_b[0].shape[2], num_slices=ctx.w13_num_slices, dtype=x.dtype,
                            use_tuned_config=ctx.use_tuned_config, small_batch=self._small_batch(ctx, num_pairs))

    def moe_lora_align_plan(self, x: torch.Tensor, ctx: "MoELoRAContext") -> Optional["MoELoRAAlignPlan"]:
        """The (adapter, expert) alignment ``add_lora_w13(y, x, ctx, ...)`` would make (its sorted path),
        so that the experts can make it in one pass with their own and pass it in (``alignment=``);
        None where it makes none (no pairs, the small-batch path, or a compute that never sorts)."""
        from vllm.lora.ops.moe_lora_align import MoELoRAAlignPlan

        num_pairs = x.shape[0] * ctx.top_k
        if not num_pairs or self._small_batch(ctx, num_pairs):
            return None
        cfg = self._w13_config(ctx, x)
        assert cfg is not None  # a wrapper that sorts takes tile configs
        return MoELoRAAlignPlan(token_lora_mapping=self._w13_mapping(ctx, x.shape[0]),
                                adapter_enabled=ctx.adapter_enabled, num_experts=ctx.local_num_experts,
                                max_loras=ctx.max_loras, block_size=cfg.block_size_m)

    def moe_lora_alignment(self, x: torch.Tensor, ctx: "MoELoRAContext", *, topk_ids: torch.Tensor,
                           expert_map: Optional[torch.Tensor] = None) -> Optional["MoELoRAAlignment"]:
        """The (adapter, expert) alignment ``add_lora_w13(y, x, ctx, topk_ids=..., expert_map=...)`` makes when
        given none (None where it makes none: ``moe_lora_align_plan``), for a caller that makes it earlier or
        elsewhere - e.g. on a side stream beside GEMM1 (``experts/lora_overlap.ALIGN_BESIDE``) - and passes it in."""
        plan = self.moe_lora_align_plan(x, ctx)
        if plan is None:
            return None
        return self._align(topk_ids, plan.token_lora_mapping, num_experts=plan.num_experts, max_loras=plan.max_loras,
                           adapter_enabled=plan.adapter_enabled, expert_map=expert_map,
                           config=self._w13_config(ctx, x))

    def add_lora_w13(self, y: torch.Tensor, x: torch.Tensor, ctx: "MoELoRAContext", *, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor, expert_map: Optional[torch.Tensor] = None,
                     alignment: Optional["MoELoRAAlignment"] = None, overwrite: bool = False) -> MoELoRARouting:
        """Add the w13 LoRA delta of the layer whose LoRA state is ``ctx`` into the GEMM1 output
        ``y`` [M*top_k, N_total] in place (``overwrite``: y = the delta, 0 where a pair gets none; for a
        delta buffer of its own, ``experts/lora_overlap.py``).

        x: [M, H] hidden states; topk_ids / topk_weights: [M, top_k].
        The rows of x are the step's tokens, or, when ``ctx.token_lora_mapping`` is set (an
        expert-parallel dispatch moved rows between ranks), the rows that mapping gives slots.
        alignment: the (adapter, expert) alignment of these pairs, made by the caller as
        ``moe_lora_align_plan(x, ctx)`` describes (``moe_align_with_lora``); the sorted path then
        reads it instead of aligning again.  None: the wrapper aligns (or not) itself.
        Returns the routing for ``add_lora_w2``.
        """
        M = x.shape[0]
        num_pairs = M * ctx.top_k
        mapping = self._w13_mapping(ctx, M)
        y2 = y.reshape(num_pairs, y.shape[-1])
        lora_a, lora_b = ctx.w13_lora_a_stacked, ctx.w13_lora_b_stacked
        cfg = self._w13_config(ctx, x)
        if alignment is not None and (alignment.numel, alignment.num_experts, alignment.max_loras) != (
                num_pairs, ctx.local_num_experts, ctx.max_loras):
            raise ValueError(f"alignment was made for {alignment.numel} pairs, {alignment.num_experts} experts and "
                             f"{alignment.max_loras} slots; this layer's step has {num_pairs}, "
                             f"{ctx.local_num_experts} and {ctx.max_loras}: make it from moe_lora_align_plan(x, ctx)")
        if alignment is None:
            alignment = self.moe_lora_alignment(x, ctx, topk_ids=topk_ids, expert_map=expert_map)
        routing = MoELoRARouting(alignment=alignment, token_lora_mapping=mapping, num_pairs=num_pairs)
        if num_pairs == 0:
            return routing
        kw = dict(topk_ids=topk_ids, topk_weights=topk_weights, token_lora_mapping=mapping,
                  adapter_enabled=ctx.adapter_enabled, top_k_in=ctx.top_k, expert_map=expert_map,
                  alignment=alignment, config=cfg)
        if ctx.fully_sharded and ctx.tp_size > 1:
            # S-LoRA: each rank holds R/tp rows of A.  Gather the fp32 shrink along
            # rank (in rank order, so a zero-padded tail stays at the end), then expand.
            if overwrite:
                y2.zero_()
            shrunk = self._shrink(x, lora_a, **_without(kw, "topk_weights"))  # [S, pairs, R/tp] fp32
            shrunk = self._group().all_gather(shrunk, dim=2).contiguous()
            self._expand(y2, shrunk, lora_b, mul_routed_weight=False, **_without(kw, "top_k_in"))
        else:
            self._fused(y2, x, lora_a, lora_b, mul_routed_weight=False, overwrite=overwrite, **kw)
        return routing

    def add_lora_w2(self, y: torch.Tensor, x: torch.Tensor, ctx: "MoELoRAContext", *, routing: MoELoRARouting,
                    topk_ids: torch.Tensor, topk_weights: torch.Tensor, mul_routed_weight: bool,
                    expert_map: Optional[torch.Tensor] = None, overwrite: bool = False) -> None:
        """Add the w2 LoRA delta of the layer whose LoRA state is ``ctx`` into the GEMM2 output
        ``y`` [M*top_k, H] in place (``overwrite``: y = the delta, as for ``add_lora_w13``).

        x: [M*top_k, I_part] activation output; ``routing``: what ``add_lora_w13`` returned.
        ``mul_routed_weight`` must be True exactly when the base GEMM2 output was multiplied
        by the router weight (not when the weight was applied on the input).
        """
        num_pairs = routing.num_pairs
        if num_pairs == 0:
            return
        y2 = y.reshape(num_pairs, y.shape[-1])
        lora_a, lora_b = ctx.w2_lora_a_stacked, ctx.w2_lora_b_stacked
        h_b = lora_b[0].shape[2]
        cfg = self._config("fused_moe_lora_w2", num_pairs=num_pairs, num_experts=ctx.local_num_experts,
                           max_loras=ctx.max_loras, rank=lora_a[0].shape[2], K=x.shape[1], N=h_b,
                           num_slices=1, dtype=x.dtype, use_tuned_config=ctx.use_tuned_config,
                           small_batch=routing.alignment is None)  # w13's path
        kw = dict(topk_ids=topk_ids, topk_weights=topk_weights, token_lora_mapping=routing.token_lora_mapping,
                  adapter_enabled=ctx.adapter_enabled, top_k_in=1, expert_map=expert_map,
                  alignment=routing.alignment, config=cfg)
        if ctx.fully_sharded and ctx.tp_size > 1:
            # A is sharded on its input columns: the fp32 shrink partial sums are
            # all-reduced, then each rank expands its H/tp rows of B at its offset.
            if overwrite:
                y2.zero_()
            shrunk = self._group().all_reduce(self._shrink(x, lora_a, **_without(kw, "topk_weights")))
            self._expand(y2, shrunk, lora_b, mul_routed_weight=mul_routed_weight,
                         n_offset=h_b * ctx.tp_rank, **_without(kw, "top_k_in"))
        else:
            self._fused(y2, x, lora_a, lora_b, mul_routed_weight=mul_routed_weight, overwrite=overwrite, **kw)

    # ---- dense LoRA (linear layers) ----------------------------------------------
    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: Sequence[torch.Tensor],
                        lora_b_stacked: Sequence[torch.Tensor], *, output_offsets: Optional[Sequence[int]] = None,
                        offset_start: int = 0, adapter_enabled: Optional[torch.Tensor] = None) -> None:
        """Add the LoRA delta of a linear layer into its output ``y`` in place, with the step's mapping.

        y: [..., cols] (a view of its rows as [T, cols] must exist); x: [..., K] with the same T rows.
        lora_a_stacked: per slice [L, R, K]; lora_b_stacked: per slice [L, N_s, R].
        Slice s goes to columns [off_s, off_s + N_s): ``output_offsets``, or the running sum of
        the N_s from ``offset_start``.  Math and dtypes: ``vllm.lora.ops.triton_ops.lora_linear``.
        """
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        offsets = slice_offsets([b.shape[1] for b in lora_b_stacked], output_offsets, offset_start)
        self._add_lora_linear(y2, x2, tuple(lora_a_stacked), tuple(lora_b_stacked),
                              token_lora_mapping=self._mapping_for(x2.shape[0]), adapter_enabled=adapter_enabled,
                              output_offsets=offsets)

    def _add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a: tuple, lora_b: tuple, *,
                         token_lora_mapping: torch.Tensor, adapter_enabled: Optional[torch.Tensor],
                         output_offsets: list[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no dense LoRA compute")

    def _group(self) -> TPGroup:
        if self.tp_group is None:
            raise RuntimeError("fully-sharded MoE LoRA with tp_size > 1 needs a tp_group on the Punica wrapper")
        return self.tp_group
