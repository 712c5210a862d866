"""The MoE LoRA deltas in fp32 buffers of their own, computed on a second CUDA stream beside the base GEMMs.

On the in-place path each LoRA seam adds its delta into the GEMM's output, after the GEMM: a
read-modify-write that must wait for it, so at decode the layer's time is the GEMMs' plus the LoRA
kernels' (mostly launch latency and dependent loads).  Here each seam writes its delta into an fp32
buffer of its own (``overwrite``: the per-pair kernels store each tile, zeros for pairs without a delta,
so the buffer is neither zeroed nor read first), on a side stream while the base GEMM runs on the current one
(``LORA_SIDE_STREAM``; in order without it), and the buffer joins where the GEMM output is read
next: the activation (w13, ``moe_activation(delta=)``) and the top-k sum (w2, ``moe_sum(delta=)``),
which round ``x + delta`` to x's dtype first, as the in-place add does.

Bits: the side stream changes nothing (the same kernels on the same buffers, in another order).
Against the in-place path the math is the same, but the LoRA kernels are compiled for an fp32 output
instead of the activation dtype, and on an H200 that changed their reduction order at Qwen3-30B-A3B's
widths at 64 tokens (one bf16 unit in the last place on some outputs); the interpreter gives equal bits.

CUDA graphs capture both streams (the side stream forks from the current one by an event and is
joined back by another); the joining launches wait for both streams (no PDL); nothing synchronises
with the host.  Used where the LoRA takes the per-pair kernels (decode-sized steps; see ``applies``)
and the delta buffers are small (``MAX_DELTA_BYTES``), not on the fully-sharded tensor-parallel path
(its collectives stay in order on the current stream).

On the sorted path the seams stay in place, but with ``ALIGN_BESIDE`` the w13 seam's (adapter, expert)
alignment - three short, latency-bound launches - is made on the side stream while GEMM1 runs, instead of in
line between GEMM1 and the LoRA kernels (``MoELoRAExpertsMixin.align_beside``).  Its buffers are allocated
on the side stream and read on the current one; that is safe because every use of the side stream starts by
waiting for the current stream (``beside``), so a block the caching allocator hands out again on the side
stream is written only after the current stream's reads of its last owner.  Splitting each sorted seam in two,
its shrink beside the GEMM and only its expand in line, was timed slower (NVIDIA H100, thirty-fourth session: the
LoRA decode step at batch 256 1.008x, the layer at 1024 / 4096 tokens +2 % / +1 %; branch ``shrink-beside``).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

#: compute the delta buffers on a side stream, beside the base GEMMs (False: in order on the current stream)
LORA_SIDE_STREAM = True
#: on the sorted LoRA path (in place), make the (adapter, expert) alignment - three short launches - on the side
#: stream beside GEMM1 instead of in line after it (decode switch ``moe-lora-align-beside``).  NVIDIA H100
#: (thirty-third session): the LoRA decode step at batch 256 7.835 -> 7.703 ms, batches 1-64 unchanged (Qwen3-30B-A3B
#: width, 12 layers, graphs + async); the layer with LoRA at 256 / 1024 tokens 513.0 -> 498.5 / 632.4 -> 619.3 us
ALIGN_BESIDE = True
#: the largest fp32 delta buffer (pairs x the wider of GEMM1's and GEMM2's outputs x 4 bytes) of the path; decode
#: steps are far below it (Qwen3-30B-A3B, 64 tokens: 3 MiB; Mixtral-8x7B, 64 tokens: 14 MiB)
MAX_DELTA_BYTES = 64 << 20
#: device types that take the path; a CPU has no second stream (tests add "cpu": the buffers, in order)
DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_T = TypeVar("_T")
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def applies(device: torch.device, pairs: int, widths: tuple[int, int], *, per_pair: bool,
            fully_sharded_tp: bool) -> bool:
    """Whether a MoE forward with LoRA on ``device`` with ``pairs`` (token, expert) pairs and GEMM outputs of
    ``widths`` columns takes the delta buffers (decided from shapes and host state only: graph-safe).
    ``per_pair``: the LoRA takes the per-pair kernels (``PunicaWrapper.moe_lora_per_pair``).  The sorted path
    stays in place: it was slower beside the GEMMs (H200, Qwen3-30B-A3B at 256 tokens: 408 -> 437 us; in the
    decode step at batch 256 +6.5 %, with the side stream at the highest priority too), and its w2 kernel may
    fuse ``out + delta * router weight`` into one rounding, which a separate buffer cannot repeat."""
    return (per_pair and device.type in DEVICE_TYPES and not fully_sharded_tp and pairs > 0
            and pairs * max(widths) * 4 <= MAX_DELTA_BYTES)


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of a CUDA device, made on first use (one per device for the process)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def delta_buffer(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An fp32 [rows, cols] delta buffer, allocated on the current stream; the seam overwrites all of it."""
    return torch.empty((rows, cols), dtype=torch.float32, device=device)


def beside(device: torch.device, side: Callable[[], _T], main: Callable[[], None]) -> _T:
    """Run ``side()`` (the LoRA seam overwriting its delta buffer) on the side stream while ``main()`` (the base
    GEMM) runs on the current stream; the current stream then waits for both.  Returns what ``side`` returns.
    Without ``LORA_SIDE_STREAM``, or on a device without streams (CPU), the two run one after the other."""
    if device.type != "cuda" or not LORA_SIDE_STREAM:
        out = side()
        main()
        return out
    current = torch.cuda.current_stream(device)
    stream = side_stream(device)
    stream.wait_stream(current)  # the seam's inputs (x, routing, the buffer's allocation) are the current stream's
    with torch.cuda.stream(stream):
        out = side()
    main()
    current.wait_stream(stream)
    return out

