"""The engine's adapters: loaded, in use, and unloaded while still in use.

A request runs on the weights its adapter had when the request was added:

- ``add`` (``LLMEngine.add_lora``, or ``add_request`` with a ``LoRARequest``) reads and
  validates the folder into the LoRA manager's CPU cache.  Only these explicit calls
  ever read an adapter folder.
- While live requests use an adapter it is never evicted from the CPU cache (the cache
  may then hold more than ``max_cpu_loras`` adapters for a while); adapters no live
  request uses are evicted least recently used first, and loaded again from their
  folder by the next ``add`` that names them.
- ``remove`` (``LLMEngine.remove_lora``): new requests for the adapter are refused at
  once; requests already added finish on its cached weights ("draining"); when the last
  of them finishes, the weights are dropped.  An unloaded adapter is never read from
  its folder again unless the user adds it again - which, while it is still draining,
  is refused (same id, other weights would be ambiguous): use a new ``lora_int_id``.

Prefix caching: ``cache_key`` names the adapter's current load (id, name, path and a
generation counted up at every read of its folder), so KV cached under an adapter is
never reused for a later load, whose weights may differ (the folder rewritten, or a
different adapter added under the same id and path after an unload).
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Optional

from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.sequence import adapter_cache_key

if TYPE_CHECKING:
    from vllm.core.scheduler import SchedulerOutput

logger = init_logger(__name__)


class LoRARegistry:
    """Bookkeeping around the (rank 0, mirrored) ``LoRAModelManager``; engine thread only."""

    def __init__(self, manager: Optional[Any]) -> None:
        self.manager = manager
        self.loaded: dict[int, LoRARequest] = {}
        self.draining: dict[int, LoRARequest] = {}  # unloaded, still used by live requests
        self._users: Counter[int] = Counter()  # lora_int_id -> live requests using it
        self._loads = 0  # folder reads so far
        self._generation: dict[int, int] = {}  # lora_int_id -> the read its cached weights come from

    def _protect_in_use(self) -> None:
        """Pin every adapter a live request uses, so loading another one never evicts it."""
        self.manager.pin_adapters(set(self._users))

    def add(self, lora_request: LoRARequest) -> bool:
        """Load (and validate) an adapter into the CPU cache; errors leave everything as it was."""
        if self.manager is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested but LoRA is not enabled; "
                             "start the engine with enable_lora=True")
        lid = lora_request.lora_int_id
        draining = self.draining.get(lid)
        if draining is not None:
            raise ValueError(f"LoRA adapter {draining.lora_name!r} (lora_int_id {lid}) is not loaded: it was "
                             f"unloaded, and {self._users[lid]} request(s) added before still finish on it. "
                             "Load it again under a new lora_int_id, or once those requests have finished")
        known = self.loaded.get(lid)
        if known is not None and known.lora_path != lora_request.lora_path:
            raise ValueError(f"lora_int_id {lid} already names adapter {known.lora_name!r} "
                             f"({known.lora_path}); give each adapter its own id")
        self._protect_in_use()
        added = self.manager.add_adapter(lora_request)
        if added or lid not in self._generation:  # read from its folder now: weights that may be new
            self._loads += 1
            self._generation[lid] = self._loads
        self.loaded[lid] = lora_request
        return added

    def cache_key(self, lora_request: Optional[LoRARequest]) -> str:
        """The prefix-cache key of KV computed now under ``lora_request`` ('' for the base model)."""
        if lora_request is None:
            return ""
        return adapter_cache_key(lora_request, self._generation.get(lora_request.lora_int_id, 0))

    def remove(self, lora_int_id: int) -> bool:
        """Unload; False if it was not loaded.  Requests using it finish on its cached weights."""
        req = self.loaded.pop(lora_int_id, None)
        if req is None:
            return False
        if self._users[lora_int_id] > 0:
            self.draining[lora_int_id] = req
            logger.info("LoRA adapter %r unloaded; %d request(s) still finish on it", req.lora_name,
                        self._users[lora_int_id])
        else:
            self.manager.remove_adapter(lora_int_id)
        return True

    def acquire(self, lora_request: Optional[LoRARequest]) -> None:
        """A request using the adapter was added."""
        if lora_request is not None:
            self._users[lora_request.lora_int_id] += 1

    def release(self, lora_request: Optional[LoRARequest]) -> None:
        """A request using the adapter left the engine (finished, aborted or failed)."""
        if lora_request is None:
            return
        lid = lora_request.lora_int_id
        self._users[lid] -= 1
        if self._users[lid] > 0:
            return
        del self._users[lid]
        req = self.draining.pop(lid, None)
        if req is not None:
            self.manager.remove_adapter(lid)
            logger.info("LoRA adapter %r: its last request finished; weights dropped", req.lora_name)

    def check_batch(self, batch: "SchedulerOutput") -> dict[str, str]:
        """Request id -> error for the batch's sequences whose adapter's weights are not cached.

        Cannot happen while in-use adapters are protected; kept so that a bug surfaces as
        one failed request rather than a weight read behind the user's back.  Per step it asks the
        manager about each distinct adapter of the batch (``batch.adapters``: no per-sequence work
        while the batch is the previous step's sequences); only when one is missing are the
        sequences searched for its requests."""
        if self.manager is None:
            return {}
        missing = {lid for lid in batch.adapters.distinct if self.manager.get_request(lid) is None}
        if not missing:
            return {}
        failed = {}
        for seq in batch.scheduled_seqs:
            req = seq.lora_request
            if req is not None and req.lora_int_id in missing:
                failed[seq.request_id] = (f"the weights of LoRA adapter {req.lora_name!r} (lora_int_id "
                                          f"{req.lora_int_id}) are no longer cached; add the request again")
        return failed
