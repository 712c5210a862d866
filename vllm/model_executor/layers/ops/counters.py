"""Zeroed int32 counters for kernels whose last program finishes the work (a "last block" reduction).

A kernel counts its programs in an int32 with an atomic add; the program that brings the count to the number
of programs does the final step and writes the counter back to 0, so the buffer is zero between launches and
one allocation serves every later launch, CUDA-graph replays included.  The buffers are allocated on first use,
outside CUDA-graph capture (the engine runs each graph's step eagerly before capturing it)."""
from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def zeroed_counters(user: str, n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` zero int32 counters on ``device`` for the kernel named ``user`` (one buffer per user)."""
    key = (user, torch.device(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            have = 0 if buf is None else buf.numel()
            raise RuntimeError(f"{user} needs {n} zeroed counters on {device} but {have} exist: run the step "
                               f"eagerly once before capturing it in a CUDA graph")
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf
