"""The MoE LoRA deltas on a second CUDA stream, beside the base GEMMs.

On the serial path each LoRA seam adds its delta into the GEMM's output in place, after the GEMM: a
read-modify-write that must wait for it, so at decode the layer's time is the GEMMs' plus the LoRA
kernels' (mostly launch latency and dependent loads).  Here each seam writes its delta into an fp32
buffer of its own, on a side stream, while the base GEMM runs on the current one; the buffer joins
where the GEMM output is read next: the activation (w13, ``moe_activation(delta=)``) and the top-k sum
(w2, ``moe_sum(delta=)``).

Bits: the buffer is zeroed and the LoRA kernels add their fp32 delta to it (0 + d = d), and the
activation and the sum round ``x + delta`` to x's dtype before using it: the same bits as the serial
path's in-place add (the sign of a zero aside), so the two paths give the same tokens.

CUDA graphs capture both streams (the side stream forks from the current one by an event and is
joined back by another); nothing synchronises with the host.  Used where the LoRA takes the per-pair
kernels (decode-sized steps; see ``applies``) and the delta buffers are small (``MAX_DELTA_BYTES``), not
on the fully-sharded tensor-parallel path (its collectives stay on the current stream);
``LORA_SIDE_STREAM`` switches it off.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

#: run the MoE LoRA deltas beside the base GEMMs where ``applies`` says so
LORA_SIDE_STREAM = True
#: the largest fp32 delta buffer (pairs x the wider of GEMM1's and GEMM2's outputs x 4 bytes) that takes the side
#: stream; decode steps are far below it (Qwen3-30B-A3B, 64 tokens: 3 MiB; Mixtral-8x7B, 64 tokens: 14 MiB)
MAX_DELTA_BYTES = 64 << 20
#: device types that take the path; CPU has no second stream, so there it runs in order (tests add "cpu")
DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_T = TypeVar("_T")
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def applies(device: torch.device, pairs: int, widths: tuple[int, int], *, per_pair: bool,
            fully_sharded_tp: bool) -> bool:
    """Whether a MoE forward with LoRA on ``device`` with ``pairs`` (token, expert) pairs and GEMM outputs of
    ``widths`` columns takes the side stream (decided from shapes and host state only: graph-safe).
    ``per_pair``: the LoRA takes the per-pair kernels (``PunicaWrapper.moe_lora_per_pair``).  The sorted path
    stays serial: it was slower beside the GEMMs (H200, Qwen3-30B-A3B at 256 tokens: 408 -> 437 us), and its
    w2 kernel may fuse ``out + delta * router weight`` into one rounding, which a separate buffer cannot repeat."""
    return (LORA_SIDE_STREAM and per_pair and device.type in DEVICE_TYPES and not fully_sharded_tp and pairs > 0
            and pairs * max(widths) * 4 <= MAX_DELTA_BYTES)


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of a CUDA device, made on first use (one per device for the process)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def delta_buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An fp32 [rows, cols] delta buffer, allocated on the current stream and zeroed by ``beside``'s side work."""
    return torch.empty((rows, cols), dtype=torch.float32, device=device)


def beside(device: torch.device, delta: torch.Tensor, side: Callable[[], _T], main: Callable[[], None]) -> _T:
    """Zero ``delta`` and run ``side()`` (the LoRA seam writing into it) on the side stream while ``main()`` (the
    base GEMM) runs on the current stream; the current stream then waits for both.  Returns what ``side`` returns.
    On a device without streams (CPU) the two run one after the other."""
    if device.type != "cuda":
        delta.zero_()
        out = side()
        main()
        return out
    current = torch.cuda.current_stream(device)
    stream = side_stream(device)
    stream.wait_stream(current)  # the seam's inputs (x, routing, the buffer's allocation) are the current stream's
    with torch.cuda.stream(stream):
        delta.zero_()
        out = side()
    main()
    current.wait_stream(stream)
    return out

