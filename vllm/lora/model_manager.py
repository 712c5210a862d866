"""``LoRAModelManager``: wraps a model's layers for LoRA and moves adapters between disk, CPU and slots.

    LoRARequest --add_adapter--> CPU cache (LRU, max_cpu_loras LoRAModels, loaded by peft_loader;
                                 under expert parallelism only this rank's experts are kept)
        --activate_adapter--> device slot (max_loras; LRU over slots not used by the current batch)
            set_lora / reset_lora on every wrapped layer
            and the layers it targets join the Punica wrapper's LoRA layer set (``add_lora_layers``)
    set_adapter_mapping(lora_int_id per token)  once per step
        -> activates the batch's adapters -> slot per token -> punica_wrapper.update_metadata
           (one mapping, read by every layer; reused as is while the ids and the slots do not change)

Construction walks the model once (after its weights are loaded) and replaces
each supported layer by its LoRA wrapper: ``FusedMoE`` -> ``FusedMoEWithLoRA``
(``FusedMoE3DWithLoRA`` for gpt-oss-style interleaved experts), the five linear
kinds -> ``vllm.lora.layers.linear`` wrappers.  It does not descend into a
``FusedMoE``, so a shared expert is found (and named) under its HF path
(``mlp.shared_expert.*``) where it is a dense module like any other.

Module names: adapters use HF names, the model packs some of them
(``packed_modules_mapping``, e.g. ``qkv_proj: [q_proj, k_proj, v_proj]``).
``module_table`` lists every adapter-side name with its expected sizes: the
unpacked names (``...self_attn.q_proj`` -> slice 0 of ``...self_attn.qkv_proj``)
and the packed name itself (an adapter that targets ``qkv_proj`` directly: its
B is split by output size, A shared by the slices).  A slice an adapter does
not target stays zero.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vllm.config.lora import LoRAConfig
from vllm.logger import init_logger
from vllm.lora.layers.base import BaseLayerWithLoRA
from vllm.lora.layers.fused_moe import FusedMoE3DWithLoRA, FusedMoEWithLoRA
from vllm.lora.layers.linear import BaseLinearLayerWithLoRA, linear_lora_class
from vllm.lora.lora_weights import (LoRALayerWeights, LoRAModel, LoRAModuleSpec, MoELoRALayerWeights,
                                     MoELoRAModuleSpec, ModuleSpec)
from vllm.lora.peft_loader import load_peft_adapter
from vllm.lora.request import LoRARequest

logger = init_logger(__name__)


class LoRAModelManager:
    """Adapters of one model: wrapped layers, device slots and the CPU cache.

    model: an ``nn.Module`` with weights loaded; ``packed_modules_mapping`` read from it.
    punica_wrapper: the wrapper every layer reads the step's token mapping from.
    target_modules: optional last-name filter (e.g. ``["qkv_proj", "experts"]``) of the
        layers to wrap; default all supported layers.
    """

    def __init__(self, model: nn.Module, lora_config: LoRAConfig, punica_wrapper: Any, *,
                 target_modules: Optional[Sequence[str]] = None) -> None:
        self.model = model
        self.lora_config = lora_config
        self.punica_wrapper = punica_wrapper
        self.max_loras = lora_config.max_loras
        self.capacity = lora_config.max_cpu_loras
        if punica_wrapper.max_loras < self.max_loras:
            raise ValueError(f"the Punica wrapper has {punica_wrapper.max_loras} slots, max_loras is {self.max_loras}")
        self.packed_modules_mapping: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
        self._target_filter = set(target_modules) if target_modules else None
        self.modules: dict[str, BaseLayerWithLoRA] = {}
        self._walk(model, "", set())
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no layer that can take LoRA (FusedMoE or the linear "
                             "layers of vllm.model_executor.layers.linear)")
        for wrapper in self.modules.values():
            wrapper.create_lora_weights(self.max_loras, lora_config)
            wrapper.set_mapping(punica_wrapper)
        self.module_table: dict[str, ModuleSpec] = {}
        self._sources: dict[str, list[tuple[str, Optional[int]]]] = {}  # module -> (adapter name, slice | None)
        self._build_module_table()
        self._cache_dtype = self._buffer_dtype()
        self._cache: OrderedDict[int, LoRAModel] = OrderedDict()  # least recently used first
        self._requests: dict[int, LoRARequest] = {}
        self._slot_ids: list[Optional[int]] = [None] * self.max_loras
        self._slot_lru: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first
        self._pinned: set[int] = set()  # adapters of the current batch
        self._slots_version = 0  # counts the changes of what the slots hold
        self._last_step: Optional[_StepMapping] = None  # the previous set_adapter_mapping's
        logger.info("LoRA: wrapped %d layers (%d MoE), %d slots, CPU cache of %d", len(self.modules),
                    sum(isinstance(m, FusedMoEWithLoRA) for m in self.modules.values()), self.max_loras,
                    self.capacity)

    # ---- wrapping ---------------------------------------------------------------------
    def _lora_class(self, name: str, module: nn.Module) -> Optional[type]:
        last = name.rsplit(".", 1)[-1]
        packed = self.packed_modules_mapping.get(last)
        if self._target_filter is not None and last not in self._target_filter and not (
                packed and self._target_filter & set(packed)):
            return None
        for cls in (FusedMoE3DWithLoRA, FusedMoEWithLoRA):
            if cls.can_replace_layer(module, self.lora_config):
                return cls
        return linear_lora_class(module, self.lora_config, packed)

    def _walk(self, module: nn.Module, prefix: str, seen: set[int]) -> None:
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, BaseLayerWithLoRA):
                raise ValueError(f"{name} is already LoRA-wrapped: build one LoRAModelManager per model")
            cls = self._lora_class(name, child)
            if cls is not None:
                wrapper = cls(child)
                setattr(module, child_name, wrapper)
                self.modules[name] = wrapper
            elif type(child).__name__ != "FusedMoE":
                self._walk(child, name, seen)

    def _build_module_table(self) -> None:
        for name, w in self.modules.items():
            if isinstance(w, FusedMoEWithLoRA):
                base = w.base_layer
                self.module_table[name] = MoELoRAModuleSpec(
                    num_experts=base.global_num_experts, hidden_size=base.hidden_size,
                    intermediate_size=base.moe_config.intermediate_size, gated=base.activation.is_gated,
                    w13_slices=w.w13_num_slices)
                self._sources[name] = [(name, None)]
                continue
            assert isinstance(w, BaseLinearLayerWithLoRA)
            prefix, _, last = name.rpartition(".")
            packed = self.packed_modules_mapping.get(last)
            sources: list[tuple[str, Optional[int]]] = []
            if packed and len(packed) == w.n_slices:
                for s, sub in enumerate(packed):
                    sub_name = f"{prefix}.{sub}" if prefix else sub
                    if sub_name == name:
                        continue
                    self.module_table[sub_name] = LoRAModuleSpec(w.input_size, w.output_sizes_full[s])
                    sources.append((sub_name, s))
            self.module_table[name] = LoRAModuleSpec(w.input_size, sum(w.output_sizes_full))
            sources.append((name, 0 if w.n_slices == 1 else None))
            self._sources[name] = sources

    def _buffer_dtype(self) -> torch.dtype:
        w = next(iter(self.modules.values()))
        return (w.lora_a_stacked[0] if isinstance(w, BaseLinearLayerWithLoRA) else w.w13_lora_a_stacked[0]).dtype

    # ---- CPU cache ------------------------------------------------------------------------
    def add_adapter(self, lora_request: LoRARequest) -> bool:
        """Load, validate and cache an adapter; False if it was already cached.

        Raises ``LoRALoadError`` for a bad adapter (nothing is evicted then).  A full cache
        drops its least recently used adapter that is not pinned (``pin_adapters``); when all
        are pinned it holds one more than its capacity for a while.
        """
        lid = lora_request.lora_int_id
        if lid in self._cache:
            self._cache.move_to_end(lid)
            return False
        lora = load_peft_adapter(lora_request.lora_path, self.module_table,
                                 max_lora_rank=self.lora_config.max_lora_rank, lora_int_id=lid,
                                 name=lora_request.lora_name, dtype=self._cache_dtype,
                                 name_mapper=getattr(self.model, "map_hf_module_name", None))
        self._keep_local_experts(lora)
        while len(self._cache) >= self.capacity and self._evict_from_cache():
            pass
        self._cache[lid] = lora
        self._requests[lid] = lora_request
        return True

    def _keep_local_experts(self, lora: LoRAModel) -> None:
        """Expert parallelism: keep only this rank's experts of every MoE module, once, at load."""
        for name, w in self.modules.items():
            if not isinstance(w, FusedMoEWithLoRA) or w.base_layer.expert_map is None:
                continue
            moe = lora.get_lora(name)
            if isinstance(moe, MoELoRALayerWeights):
                lora.loras[name] = moe.restricted_to(w.local_expert_ids())

    def _evict_from_cache(self) -> bool:
        """Drop the least recently used unpinned adapter; False when every cached one is pinned."""
        candidates = [i for i in self._cache if i not in self._pinned]
        if not candidates:
            # Every cached adapter is pinned (in use): keep them all and let the cache run
            # over its capacity; later additions evict it back down.
            logger.info("LoRA: CPU cache over capacity (%d) while requests use all cached adapters; "
                        "consider a larger max_cpu_loras", self.capacity)
            return False
        idle = [i for i in candidates if i not in self._slot_lru]  # prefer one that holds no slot
        victim = (idle or candidates)[0]
        logger.info("LoRA: evicting adapter %d from the CPU cache", victim)
        self.remove_adapter(victim)
        return True

    def pin_adapters(self, lora_int_ids) -> None:
        """Protect these adapters from eviction (from the CPU cache and from slots) until the next
        pin.  The engine pins the adapters its live requests use before it loads another one;
        ``set_adapter_mapping`` pins the batch's."""
        self._pinned = {int(i) for i in lora_int_ids if int(i) != 0}
        # the cache may have run over capacity while more adapters were pinned: shrink it back now
        while len(self._cache) > self.capacity and self._evict_from_cache():
            pass

    def remove_adapter(self, lora_int_id: int) -> bool:
        """Drop an adapter from the cache and clear its slot (the slot then contributes exactly zero)."""
        if lora_int_id not in self._cache:
            return False
        self.deactivate_adapter(lora_int_id)
        del self._cache[lora_int_id]
        self._requests.pop(lora_int_id, None)
        self._pinned.discard(lora_int_id)
        return True

    def list_adapters(self) -> dict[int, LoRAModel]:
        """Cached adapters by id, least recently used first."""
        return dict(self._cache)

    def get_request(self, lora_int_id: int) -> Optional[LoRARequest]:
        return self._requests.get(lora_int_id)

    # ---- device slots --------------------------------------------------------------------
    @property
    def active_adapters(self) -> dict[int, int]:
        """lora_int_id -> slot of the adapters resident in slots."""
        return dict(self._slot_lru)

    def get_slot(self, lora_int_id: int) -> Optional[int]:
        return self._slot_lru.get(lora_int_id)

    def activate_adapter(self, lora_int_id: int) -> int:
        """Make a cached adapter resident in a slot and return the slot.

        Takes a free slot, else the least recently used slot whose adapter the
        current batch does not use.
        """
        if lora_int_id not in self._cache:
            raise KeyError(f"LoRA adapter {lora_int_id} is not loaded; call add_adapter first")
        self._cache.move_to_end(lora_int_id)
        if lora_int_id in self._slot_lru:
            self._slot_lru.move_to_end(lora_int_id)
            return self._slot_lru[lora_int_id]
        if None in self._slot_ids:
            slot = self._slot_ids.index(None)
        else:
            victims = [i for i in self._slot_lru if i not in self._pinned]
            if not victims:
                raise RuntimeError(f"all {self.max_loras} LoRA slots hold adapters of the current batch; "
                                   "raise max_loras")
            slot = self._slot_lru.pop(victims[0])
            logger.debug("LoRA: adapter %d leaves slot %d for adapter %d", victims[0], slot, lora_int_id)
        self._slots_version += 1
        self._write_slot(slot, self._cache[lora_int_id])
        self._slot_ids[slot] = lora_int_id
        self._slot_lru[lora_int_id] = slot
        return slot

    def deactivate_adapter(self, lora_int_id: int) -> bool:
        """Clear the adapter's slot on every layer; False if it held none."""
        slot = self._slot_lru.pop(lora_int_id, None)
        if slot is None:
            return False
        self._slots_version += 1
        for w in self.modules.values():
            w.reset_lora(slot)
        self._slot_ids[slot] = None
        return True

    def _write_slot(self, slot: int, lora: LoRAModel) -> None:
        try:
            for name, w in self.modules.items():
                if isinstance(w, FusedMoEWithLoRA):
                    moe = lora.get_lora(name)
                    if moe is None:
                        w.reset_lora(slot)
                    else:
                        w.set_lora(slot, **moe.set_lora_kwargs())
                    continue
                a, b = self._dense_slices(name, w, lora)
                if all(t is None for t in a):
                    w.reset_lora(slot)
                else:
                    w.set_lora(slot, a, b)
        finally:  # the LoRA layer set (CUDA graphs of LoRA steps launch its layers): every layer with weights
            self.punica_wrapper.add_lora_layers(w.enabled_slots for w in self.modules.values()
                                                if slot in w.enabled_slots)

    def _dense_slices(self, name: str, w: BaseLinearLayerWithLoRA, lora: LoRAModel) -> tuple[list, list]:
        a: list[Optional[torch.Tensor]] = [None] * w.n_slices
        b: list[Optional[torch.Tensor]] = [None] * w.n_slices
        for src, s in self._sources[name]:
            lw = lora.get_lora(src)
            if lw is None:
                continue
            assert isinstance(lw, LoRALayerWeights)
            if s is None:  # a packed module targeted as a whole: split B by output, share A
                pieces = lw.lora_b.split(w.output_sizes_full, dim=0)
                slices = list(enumerate(pieces))
            else:
                slices = [(s, lw.lora_b)]
            for i, piece in slices:
                if a[i] is not None:
                    raise ValueError(f"adapter {lora.lora_int_id} gives slice {i} of {name} twice ({src} and "
                                     "its unpacked name)")
                a[i], b[i] = lw.lora_a, piece
        return a, b

    # ---- per step ----------------------------------------------------------------------
    def set_adapter_mapping(self, token_lora_ids: Sequence[int]) -> list[int]:
        """Set the step's mapping from the lora_int_id of each token (0 = no adapter).

        Activates the batch's adapters (they are pinned until the next call), turns ids
        into slots and hands the slots to the Punica wrapper once for all layers.
        Returns the slot of each token (-1 = none).

        When the ids are those of the previous call and neither the slots nor the wrapper's mapping
        changed since (a decode step of the same requests), only the pins and the LRU order are
        renewed: one list comparison and O(adapters) work, nothing per token or per layer.
        """
        ids = token_lora_ids if isinstance(token_lora_ids, list) else [int(i) for i in token_lora_ids]
        last = self._last_step
        if (last is not None and last.slots_version == self._slots_version
                and last.mapping_version == self.punica_wrapper.mapping_version and ids == last.ids):
            self._pinned = set(last.batch)
            for i in last.batch:
                self._cache.move_to_end(i)
                self._slot_lru.move_to_end(i)
            return list(last.slots)
        self._last_step = None
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(arr, return_inverse=True)
        batch = [int(i) for i in uniq if i != 0]
        if any(i < 0 for i in batch):
            raise ValueError(f"lora_int_id must be >= 1 (0 = no adapter), got {[i for i in batch if i < 0]}")
        if len(batch) > self.max_loras:
            raise RuntimeError(f"the batch uses {len(batch)} adapters but max_loras is {self.max_loras}; the "
                               "scheduler must not mix more adapters than slots in one step")
        missing = [i for i in batch if i not in self._cache]
        if missing:
            raise KeyError(f"LoRA adapters {missing} are not loaded; call add_adapter first")
        self._pinned = set(batch)
        slot_of = {i: self.activate_adapter(i) for i in batch}
        table = np.array([slot_of.get(int(i), -1) for i in uniq], dtype=np.int32)
        slots = table[inverse.reshape(-1)] if arr.size else np.zeros(0, dtype=np.int32)
        self.punica_wrapper.update_metadata(slots)
        out = slots.tolist()
        self._last_step = _StepMapping(list(ids), tuple(batch), tuple(out), self._slots_version,
                                       self.punica_wrapper.mapping_version)
        return out


@dataclass(frozen=True)
class _StepMapping:
    """What one ``set_adapter_mapping`` set: reused while the ids, the slots and the wrapper's mapping stay."""

    ids: list[int]
    batch: tuple[int, ...]  # the adapters, in activation order
    slots: tuple[int, ...]
    slots_version: int
    mapping_version: int
