"""The Punica wrapper's per-step token -> slot mapping, kept on the device in one int32 buffer.

``update_metadata`` is called once per step with the slot of each token (-1 = base model); every
LoRA layer then reads the same device views (FACTS.md 4: build it once per step, not once per
layer).  The buffer is updated in place, so references to it (and CUDA graphs) stay valid: the
host builds the mapping and a subclass's per-step metadata (``_extra_regions`` / ``_fill_host``)
with numpy in a pinned staging buffer (two, used in turn) and writes them with one non-blocking
copy; a mapping equal to the previous step's costs one comparison and no copy.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

_ALIGN = 32  # entries: each region of the per-step buffer starts 128-byte aligned


class StepMapping:
    """Mixin of ``PunicaWrapperBase``: the per-step mapping buffer (see the module docstring).
    Needs ``self.device``, ``self.max_loras`` and ``self.max_num_batched_tokens``."""

    device: torch.device
    max_loras: int
    max_num_batched_tokens: int

    def _init_step_mapping(self, max_num_batched_tokens: int) -> None:
        # One int32 device buffer holds the step's mapping (and a subclass's per-step metadata, see
        # ``_extra_regions``), updated in place every step so that references (and CUDA graphs) stay valid:
        # written with one non-blocking copy from a pinned host buffer (two, used in turn).
        self._regions = {"mapping": (0, max_num_batched_tokens)}
        total = _ALIGN * -(-max_num_batched_tokens // _ALIGN)
        for name, size in self._extra_regions():
            self._regions[name] = (total, size)
            total += _ALIGN * -(-size // _ALIGN)
        self._device_buf = torch.zeros(total, dtype=torch.int32, device=self.device)
        self._token_lora_indices = self.region("mapping")
        self._token_lora_indices.fill_(-1)  # the empty mapping (other regions: zero counts)
        self._num_tokens = 0
        self._device_tail = 0  # mapping entries >= this are -1 on the device
        self._staging: list[Optional[torch.Tensor]] = [None, None]  # made at the first host mapping
        self._staging_tail = [0, 0]  # per staging buffer: mapping entries >= this are -1
        self._copied: list[Optional[Any]] = [None, None]  # per staging buffer: CUDA event after its last copy
        self._turn = 0
        self._host_mapping: Optional[np.ndarray] = np.zeros(0, dtype=np.int32)  # None: set from the device
        self.mapping_version = 0  # counts the mappings set (a caller's cache key)
        # Host-side: the slots some token of this step uses (None = unknown, e.g. a device-tensor mapping).
        self._active_slots: Optional[frozenset[int]] = frozenset()

    def _extra_regions(self) -> list[tuple[str, int]]:
        """(name, int32 entries) of per-step metadata a subclass keeps next to the mapping in the device
        buffer; it fills them in ``_fill_host`` (and ``_fill_device`` for a device mapping)."""
        return []

    def region(self, name: str) -> torch.Tensor:
        """The device view of one region of the per-step buffer (fixed address)."""
        lo, size = self._regions[name]
        return self._device_buf[lo:lo + size]

    def update_metadata(self, token_lora_mapping: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Set the slot of each token of the next step (-1 = base model).

        A host mapping (list, array, CPU tensor) costs, per step, one comparison with the previous one
        and nothing else when it did not change (a decode step of the same requests); otherwise one
        vectorised pass and one non-blocking host-to-device copy of the whole per-step buffer.  A device
        tensor is copied on the device (the subclass's metadata then made with device ops).
        """
        if isinstance(token_lora_mapping, torch.Tensor) and token_lora_mapping.device.type != "cpu":
            self._update_from_device(token_lora_mapping)
            return
        host = np.asarray(token_lora_mapping, dtype=np.int64).reshape(-1)
        n = host.size
        self._check_mapping(n, int(host.max()) if n else -1, int(host.min()) if n else -1)
        prev = self._host_mapping
        if prev is not None and prev.size == n and np.array_equal(prev, host):
            return  # the device buffer already holds this step's mapping and metadata
        host = host.astype(np.int32)
        i, self._turn = self._turn, self._turn ^ 1
        if self._staging[i] is None:
            with torch.inference_mode(False):  # a normal tensor, whichever mode the first step runs in
                self._staging[i] = torch.full(self._device_buf.shape, -1, dtype=torch.int32,
                                              pin_memory=self.device.type == "cuda")
        elif self._copied[i] is not None:
            self._copied[i].synchronize()  # its last copy has left it (two steps ago: normally long done)
        buf = self._staging[i].numpy()
        buf[:n] = host
        buf[n:self._staging_tail[i]] = -1
        self._staging_tail[i] = n
        counts = np.bincount(host + 1, minlength=self.max_loras + 1)  # [tokens without adapter, per slot]
        span = self._fill_host(buf, host, counts[1:])
        span = max(span, n, self._device_tail)
        self._device_buf[:span].copy_(self._staging[i][:span], non_blocking=True)
        if self.device.type == "cuda":
            if self._copied[i] is None:
                self._copied[i] = torch.cuda.Event()
            self._copied[i].record()
        self._device_tail = n
        self._num_tokens = n
        self._host_mapping = host
        self._active_slots = frozenset(np.flatnonzero(counts[1:]).tolist())
        self.mapping_version += 1

    def _fill_host(self, buf: np.ndarray, host: np.ndarray, slot_counts: np.ndarray) -> int:
        """Write the subclass's regions of staging buffer ``buf`` for the step's mapping ``host`` [n]
        (``slot_counts`` [max_loras]: its tokens per slot); return how many leading entries of the
        buffer must be copied (at least the mapping's n)."""
        return host.size

    def _fill_device(self) -> None:
        """Make the subclass's regions from the device mapping (``token_lora_indices``), on the device."""

    def _update_from_device(self, mapping: torch.Tensor) -> None:
        n = mapping.numel()
        self._check_mapping(n, int(mapping.max()) if n else -1, int(mapping.min()) if n else -1)
        self._token_lora_indices[:n].copy_(mapping.reshape(-1))
        self._token_lora_indices[n:].fill_(-1)
        self._num_tokens = n
        self._device_tail = self.max_num_batched_tokens
        self._host_mapping = None  # the next host mapping is written whatever it is
        self._active_slots = None
        self._fill_device()
        self.mapping_version += 1

    def _check_mapping(self, n: int, hi: int, lo: int) -> None:
        if n > self.max_num_batched_tokens:
            raise ValueError(
                f"batch of {n} tokens exceeds max_num_batched_tokens={self.max_num_batched_tokens}; "
                "raise max_num_batched_tokens when building the engine"
            )
        if n and (hi >= self.max_loras or lo < -1):
            raise ValueError(f"token_lora_mapping values must be -1 or slots in [0, {self.max_loras})")
