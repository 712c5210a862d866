"""Small host lists as device tensors, copied without waiting for the device.

``torch.tensor(values, device=cuda)`` (and ``.to(cuda)`` without ``non_blocking``) synchronises the
stream: the host waits until every kernel queued before has finished.  Async scheduling queues a step
while the previous one still runs, so the inputs of a step are copied with ``non_blocking=True`` from
pageable memory instead: CUDA stages the bytes at once and orders the copy on the stream, without a
device synchronisation."""
from __future__ import annotations

from typing import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list, or a host tensor) as a ``dtype`` tensor on ``device``, not waiting for queued work."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
