"""LoRA for the linear layers: ``y = base(x) + (x @ A[slot]^T) @ B[slot]^T`` per token.

One wrapper per sharding scheme of ``vllm.model_executor.layers.linear``:

    ReplicatedLinearWithLoRA          A [R, in], B [out, R], both whole
    ColumnParallelLinearWithLoRA      A whole, B: this rank's output rows
    MergedColumnParallelLinearWithLoRA one slice per stacked output ([gate, up]), each B sharded on its own
    QKVParallelLinearWithLoRA         three slices q, k, v; B rows by heads (KV heads replicated on
                                      tp / num_kv_heads ranks when there are fewer KV heads than ranks)
    RowParallelLinearWithLoRA         A: this rank's input columns, B whole; the delta of the partial
                                      shrink is added before the all-reduce (the sum over ranks of
                                      (x_r @ A_r^T) @ B^T is the full delta)

Buffers (L = max_loras, R = max_lora_rank; smaller adapters are zero-padded):
    _lora_a: [S, L, R, in_part];  _lora_b: [S, L, max N_s, R], N_s this rank's rows of slice s
    lora_a_stacked: per slice [L, r_k, in_part], views of ``_lora_a`` (so all slices run in one
        kernel launch) cut to the layer's kernel rank r_k (``effective_rank.py``: the largest rank
        of the adapters in its slots, rounded up); lora_b_stacked: per slice [L, N_s, r_k]
    adapter_enabled: [L + 1] int32, 1 where a slot holds an adapter

``set_lora(index, lora_a, lora_b)`` takes full (unsharded) per-slice tensors,
A [r, in] and B [out_s, r] with scaling folded in; ``None`` for a slice the
adapter does not target (it stays zero).  The wrappers rely only on the
documented attributes of the base layers (input/output sizes, partition sizes,
tp_size / tp_rank, weight, bias, output_sizes / output_partition_sizes) plus,
for a row-parallel layer with tp_size > 1, its ``tp_group`` / ``reduce_results``.
Fully sharded (S-LoRA) dense LoRA is not implemented: dense buffers are
allocated as above even with ``fully_sharded_loras`` (correct, more memory).

Forward: ``base(x)`` then ``punica_wrapper.add_lora_linear`` (skipped when no token
of the step uses this layer's adapters); or, given the ``pending_delta`` of ``lora_handoff`` (``dense_handoff.py``,
on up to 64 rows), ``base(x)`` alone, the delta added by the ops around the projection; with
``dense_concat.CONCAT_K`` (off until timed) one GEMM of ``[x | s]`` and ``[W | B]`` from 65 rows; with
``dense_overlap.DENSE_LORA_SIDE_STREAM`` (off: timed slower) the delta goes into an fp32 buffer on a side
stream beside the projection at decode sizes and joins it after.  For batches of up to ``BATCH_MAX_TOKENS``
tokens (decode; above ``SMALL_BATCH_TOKENS`` over the step's tokens grouped by slot,
``punica_wrapper.linear_metadata``) on CUDA, when some token of the step has an
adapter (of this layer or not) and the layer is in the Punica wrapper's LoRA layer set
(``step_includes_layer``), the projection and the delta run as one launch
instead (``fused_linear_lora``: y rounded once, so it may differ from the two-launch
path by one rounding of the output dtype); ``use_fused_decode`` (set by
``set_mapping`` from the device and ``VLLM_FUSED_LORA_LINEAR``) switches it.  The condition is the step's, not the
layer's, because a LoRA decode graph is captured with the LoRA ops of every layer of
the set on (``run_all_lora_ops``): an eager step must take the kernels a graph replay of
it would, or the two would round the base projection differently.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from vllm import envs
from vllm.config.lora import LoRAConfig
from vllm.lora.layers import dense_concat, dense_handoff, dense_overlap
from vllm.lora.layers.base import BaseLayerWithLoRA
from vllm.lora.layers.effective_rank import SlotRanks
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import BATCH_MAX_TOKENS
from vllm.model_executor.layers.ops.dense_gemv import linear
from vllm.model_executor.layers.ops.pending_delta import PendingDelta
from vllm.triton_utils import HAS_TRITON, triton_interpreting

_KINDS = ("QKVParallelLinear", "MergedColumnParallelLinear", "ColumnParallelLinear", "RowParallelLinear",
          "ReplicatedLinear")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: benchmarks: overrides ``VLLM_FUSED_LORA_LINEAR`` when set (``decode_switch_ab.py --switches dense-fused-lora``)
FUSED_DECODE: Optional[bool] = None
#: where the fused launch is on, only from this many rows (the <= 16-token kernel and the batch kernel are timed
#: apart: a GPU A/B may find one of them slower than F.linear + the LoRA op)
FUSED_DECODE_MIN_TOKENS = 1


def fused_decode_default(device: torch.device) -> bool:
    """Whether dense LoRA layers on ``device`` fuse projection and delta at decode: on CUDA with compiled
    Triton, when ``VLLM_FUSED_LORA_LINEAR=1`` or ``FUSED_DECODE`` (off by default: untimed since an H200 found the
    17-256-token kernel's tiles out of shared memory at rank 32, which ``batch_config`` now sizes from the rank;
    tests force it on under the interpreter per layer)."""
    on = envs.VLLM_FUSED_LORA_LINEAR if FUSED_DECODE is None else FUSED_DECODE
    return device.type == "cuda" and HAS_TRITON and not triton_interpreting() and on


def _is_plain_linear(layer: nn.Module, row_parallel: bool) -> bool:
    """Whether ``layer``'s forward is the library's ``x @ weight^T + bias`` (with tp_size 1 for a
    row-parallel one), so that the fused op may replace it: not a stand-in or subclass with its own forward."""
    from vllm.model_executor.layers import linear as base_linear

    plain = base_linear.RowParallelLinear.forward if row_parallel else base_linear.LinearBase.forward
    return getattr(type(layer), "forward", None) is plain


def linear_kind(layer: nn.Module) -> Optional[str]:
    """The most specific linear class name in ``layer``'s class hierarchy (by name, so that
    subclasses and test stand-ins are recognised), or None for other modules."""
    for cls in type(layer).__mro__:
        if cls.__name__ in _KINDS:
            return cls.__name__
    return None


class BaseLinearLayerWithLoRA(BaseLayerWithLoRA):
    base_kind = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tp_size = int(getattr(base_layer, "tp_size", 1))
        self.tp_rank = int(getattr(base_layer, "tp_rank", 0))
        self.input_size = base_layer.input_size
        self.output_sizes_full, self.output_slices = self._slice_sizes()
        self.n_slices = len(self.output_slices)
        self.punica_wrapper = None
        self.use_fused_decode = False  # see the module docstring; set by set_mapping

    # ---- what varies by sharding scheme ---------------------------------------------
    def _slice_sizes(self) -> tuple[list[int], list[int]]:
        """(full rows, this rank's rows) of each slice."""
        return [self.base_layer.output_size], [self.base_layer.output_size_per_partition]

    def _lora_a_in(self) -> int:
        return self.input_size

    def _shard_a(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def _shard_b(self, s: int, b: torch.Tensor) -> torch.Tensor:
        """This rank's rows of slice s: block ``tp_rank // replicas`` (replicas > 1 for replicated KV heads)."""
        full, part = self.output_sizes_full[s], self.output_slices[s]
        if part == full:
            return b
        replicas = max(1, self.tp_size * part // full)
        start = (self.tp_rank // replicas) * part
        return b[start:start + part]

    # ---- buffers ---------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def create_lora_weights(self, max_loras: int, lora_config: LoRAConfig, model_config: Any = None) -> None:
        w = self.base_layer.weight
        R = lora_config.max_lora_rank
        dtype = lora_config.lora_dtype or w.dtype
        self.max_loras, self.max_lora_rank = max_loras, R
        S = self.n_slices
        self._lora_a = torch.zeros(S, max_loras, R, self._lora_a_in(), dtype=dtype, device=w.device)
        self._lora_b = torch.zeros(S, max_loras, max(self.output_slices), R, dtype=dtype, device=w.device)
        self.slot_ranks = SlotRanks(max_loras, R)
        self.kernel_rank = -1
        self._cut_to_rank()
        self.adapter_enabled = torch.zeros(max_loras + 1, dtype=torch.int32, device=w.device)
        self.enabled_slots: set[int] = set()  # host mirror of adapter_enabled
        dense_concat.prepare(self)  # CONCAT_K: B beside the weight (dense_concat.py)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.max_loras:
            raise IndexError(f"LoRA slot {index} out of range [0, {self.max_loras})")

    @property
    def effective_rank(self) -> int:
        """The largest rank among the adapters in this layer's slots (0 when none)."""
        return self.slot_ranks.effective

    def _cut_to_rank(self) -> None:
        """Point ``lora_a_stacked`` / ``lora_b_stacked`` at the buffers cut to the kernel rank (strided views,
        no copy) when it changed, and tell the Punica wrapper (CUDA graphs bake the rank in)."""
        r = self.slot_ranks.kernel
        if r == self.kernel_rank:
            return
        changed = self.kernel_rank >= 0
        self.kernel_rank = r
        self.lora_a_stacked = tuple(self._lora_a[:, :, :r].unbind(0))
        self.lora_b_stacked = tuple(self._lora_b[s, :, :n, :r] for s, n in enumerate(self.output_slices))
        dense_concat.relayout(self)  # the wide weight's B columns at the new rank (CONCAT_K)
        if changed and self.punica_wrapper is not None:
            self.punica_wrapper.lora_ranks_changed()

    def reset_lora(self, index: int) -> None:
        self._check_index(index)
        self._clear_slot(index)
        self._cut_to_rank()
        dense_concat.sync_slot(self, index)  # at the settled rank (a rank change laid every slot out already)

    def _clear_slot(self, index: int) -> None:
        self._lora_a[:, index].zero_()
        self._lora_b[:, index].zero_()
        self.adapter_enabled[index] = 0
        self.enabled_slots.discard(index)
        self.slot_ranks.set(index, 0)

    def _as_list(self, t, what: str) -> list:
        if t is None or isinstance(t, torch.Tensor):
            t = [t]
        t = list(t)
        if len(t) != self.n_slices:
            raise ValueError(f"{self._name()}: {what} has {len(t)} slices, this layer has {self.n_slices}")
        return t

    def _name(self) -> str:
        return getattr(self.base_layer, "prefix", "") or type(self).__name__

    def set_lora(self, index: int, lora_a: Sequence[Optional[torch.Tensor]] | torch.Tensor,
                 lora_b: Sequence[Optional[torch.Tensor]] | torch.Tensor) -> None:
        """Copy one adapter into slot ``index``: per slice A [r, in] and B [out_s, r] (full sizes), or None."""
        self._check_index(index)
        a_list, b_list = self._as_list(lora_a, "lora_a"), self._as_list(lora_b, "lora_b")
        prepared = []
        for s, (a, b) in enumerate(zip(a_list, b_list)):
            if a is None and b is None:
                prepared.append(None)
                continue
            if a is None or b is None:
                raise ValueError(f"{self._name()} slice {s}: lora_a and lora_b must both be given or both be None")
            r = a.shape[0]
            want_a, want_b = (r, self.input_size), (self.output_sizes_full[s], r)
            if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"{self._name()} slice {s}: lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} "
                                 f"must be {want_a} / {want_b}")
            if r > self.max_lora_rank:
                raise ValueError(f"{self._name()}: adapter rank {r} exceeds max_lora_rank={self.max_lora_rank}; "
                                 "restart with a larger --max-lora-rank")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"{self._name()} slice {s}: LoRA weights contain NaN or Inf")
            prepared.append((self._shard_a(a), self._shard_b(s, b), r))
        self._clear_slot(index)  # the old adapter's columns past the new one's rank become zero
        for s, p in enumerate(prepared):
            if p is not None:
                a, b, r = p
                self._lora_a[s, index, :r].copy_(a)
                self._lora_b[s, index, : b.shape[0], :r].copy_(b)
        if any(p is not None for p in prepared):
            self.adapter_enabled[index] = 1
            self.enabled_slots.add(index)
            self.slot_ranks.set(index, max(p[2] for p in prepared if p is not None))
        self._cut_to_rank()
        dense_concat.sync_slot(self, index)

    def set_mapping(self, punica_wrapper: Any) -> None:
        self.punica_wrapper = punica_wrapper
        self.use_fused_decode = fused_decode_default(self.base_layer.weight.device)

    # ---- forward ----------------------------------------------------------------------
    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.punica_wrapper is not None and self.punica_wrapper.any_active(self.enabled_slots):
            self.punica_wrapper.add_lora_linear(y, x, self.lora_a_stacked, self.lora_b_stacked,
                                                adapter_enabled=self.adapter_enabled)
        return y

    def _with_lora(self, x: torch.Tensor, project: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``project()`` (the base projection of x) + the LoRA delta: beside it on the side stream
        (``dense_overlap.applies``), else added in place after it."""
        punica = self.punica_wrapper
        if punica is None or not punica.any_active(self.enabled_slots):
            return project()
        if dense_overlap.applies(x.device, x.numel() // max(1, x.shape[-1])):
            return dense_overlap.project_beside(
                x, self.weight.shape[0], project,
                lambda d: punica.add_lora_linear(d, x, self.lora_a_stacked, self.lora_b_stacked,
                                                 adapter_enabled=self.adapter_enabled))
        return self._add_lora(project(), x)

    def _fuse(self, x: torch.Tensor) -> bool:
        """Whether this forward runs as one fused launch: switched on, ``FUSED_DECODE_MIN_TOKENS`` to
        ``BATCH_MAX_TOKENS`` rows, an unquantized float weight and LoRA buffers of x's dtype, and some token of the
        step has an adapter (any slot) while the layer is in the LoRA layer set (see the module docstring).  Decided
        from shapes and host state only (CUDA-graph safe)."""
        if not self.use_fused_decode or self.punica_wrapper is None or x.shape[-1] == 0:
            return False
        w = self.base_layer.weight
        rows = x.numel() // x.shape[-1]
        if not max(1, FUSED_DECODE_MIN_TOKENS) <= rows <= BATCH_MAX_TOKENS or x.dtype not in _FLOATS:
            return False
        if w.dtype != x.dtype or self._lora_a.dtype != x.dtype or w.dim() != 2:
            return False
        return (_is_plain_linear(self.base_layer, self.base_kind == "RowParallelLinear")
                and self.punica_wrapper.step_includes_layer(self.enabled_slots))

    def _fused_forward(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x @ W^T (+ bias) + the LoRA delta, one launch (``fused_linear_lora``)."""
        from vllm.lora.ops.triton_ops.fused_linear_lora import fused_linear_lora

        x2 = x.reshape(-1, x.shape[-1])
        w = self.base_layer.weight
        punica, T = self.punica_wrapper, x2.shape[0]
        y = fused_linear_lora(x2, w, bias, self.lora_a_stacked, self.lora_b_stacked, punica.token_mapping(T),
                              adapter_enabled=self.adapter_enabled, meta=punica.linear_metadata(T))
        return y.view(*x.shape[:-1], w.shape[0])

    def lora_handoff(self, x: torch.Tensor) -> Optional[PendingDelta]:
        """The delta this layer hands to the ops around it for input x, or None (``dense_handoff.py``)."""
        return dense_handoff.make_pending(self, x)

    def forward(self, x: torch.Tensor, pending_delta: Optional[PendingDelta] = None) -> torch.Tensor:
        """``pending_delta``: this step's ``lora_handoff(x)`` - the projection runs bare (see ``dense_handoff``)."""
        if pending_delta is not None:
            return dense_handoff.forward_bare(self, x, pending_delta)
        if self._fuse(x):
            return self._fused_forward(x, self.base_layer.bias)
        if dense_concat.applies(self, x):
            return dense_concat.forward(self, x)
        return self._with_lora(x, lambda: self.base_layer(x))

    @classmethod
    def can_replace_layer(cls, source_layer: nn.Module, lora_config: LoRAConfig,
                          packed_modules_list: Optional[list] = None, model_config: Any = None) -> bool:
        return linear_kind(source_layer) == cls.base_kind


class ReplicatedLinearWithLoRA(BaseLinearLayerWithLoRA):
    base_kind = "ReplicatedLinear"


class ColumnParallelLinearWithLoRA(BaseLinearLayerWithLoRA):
    base_kind = "ColumnParallelLinear"


class MergedColumnParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    """One slice per stacked output (``gate_up_proj``: gate, up)."""

    base_kind = "MergedColumnParallelLinear"

    def _slice_sizes(self) -> tuple[list[int], list[int]]:
        return list(self.base_layer.output_sizes), list(self.base_layer.output_partition_sizes)


class QKVParallelLinearWithLoRA(MergedColumnParallelLinearWithLoRA):
    """Three slices q, k, v."""

    base_kind = "QKVParallelLinear"

    def _slice_sizes(self) -> tuple[list[int], list[int]]:
        full, part = super()._slice_sizes()
        if len(full) != 3:
            raise ValueError(f"{self._name()}: a QKV layer must have 3 outputs (q, k, v), got {full}")
        return full, part


class RowParallelLinearWithLoRA(BaseLinearLayerWithLoRA):
    """A sharded on input columns like the weight, B whole; delta added before the all-reduce."""

    base_kind = "RowParallelLinear"

    def _lora_a_in(self) -> int:
        return self.base_layer.input_size_per_partition

    def _shard_a(self, a: torch.Tensor) -> torch.Tensor:
        part = self.base_layer.input_size_per_partition
        return a[:, self.tp_rank * part:(self.tp_rank + 1) * part]

    def forward(self, x: torch.Tensor, pending_delta: Optional[PendingDelta] = None) -> torch.Tensor:
        if pending_delta is not None:  # one rank only (dense_handoff.make_pending)
            return dense_handoff.forward_bare(self, x, pending_delta)
        base = self.base_layer
        fuse = self._fuse(x)
        if not fuse and dense_concat.applies(self, x):  # one rank only (dense_concat.prepare)
            return dense_concat.forward(self, x)
        if self.tp_size == 1:
            return self._fused_forward(x, base.bias) if fuse else self._with_lora(x, lambda: base(x))
        # this rank's partial sum, delta included
        y = self._fused_forward(x, None) if fuse else self._with_lora(x, lambda: linear(x, base.weight))
        if getattr(base, "reduce_results", True):
            group = getattr(base, "tp_group", None)
            if group is None:
                raise RuntimeError(f"{self._name()}: tp_size {self.tp_size} needs the base layer's tp_group")
            y = group.all_reduce(y)
            return y if base.bias is None else y + base.bias
        if base.bias is not None and self.tp_rank == 0:
            y = y + base.bias
        return y


LINEAR_LORA_CLASSES = (QKVParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, ColumnParallelLinearWithLoRA,
                       RowParallelLinearWithLoRA, ReplicatedLinearWithLoRA)


def linear_lora_class(layer: nn.Module, lora_config: LoRAConfig,
                      packed_modules_list: Optional[list] = None) -> Optional[type[BaseLinearLayerWithLoRA]]:
    """The wrapper class for a linear ``layer``, or None when it is not one of the five linear kinds."""
    for cls in LINEAR_LORA_CLASSES:
        if cls.can_replace_layer(layer, lora_config, packed_modules_list):
            return cls
    return None
