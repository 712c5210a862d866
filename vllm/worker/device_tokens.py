"""A step's sampled token ids, on the device first and read on the host later (async scheduling).

``ModelRunner.launch`` returns one of these instead of a list: the step's work is queued on the
device, and nothing waits for it.  On CUDA the copy of the tokens to pinned host memory is queued
right behind the sampler, followed by an event; ``tolist()`` waits for that event only, so reading
step n's tokens does not wait for a step n+1 queued after it (a plain ``.tolist()`` of the device
tensor would: it is ordered behind everything on the stream).  On the CPU the work is done when
``launch`` returns and ``tolist()`` just reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class DeviceTokens:
    """device: [n] int64 on the device (input of a chained step); host: its copy (pinned on CUDA);
    event: recorded after the copy (None on the CPU)."""

    device: torch.Tensor
    host: torch.Tensor
    event: Optional[Any] = None

    @classmethod
    def start(cls, tokens: torch.Tensor) -> "DeviceTokens":
        """Queue the copy of ``tokens`` to the host (CUDA) and return at once."""
        if tokens.device.type != "cuda":
            return cls(tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(tokens, host, event)

    def __len__(self) -> int:
        return self.device.shape[0]

    def tolist(self) -> list[int]:
        """The token ids on the host: waits for this step's copy (and what was queued before it) only."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
