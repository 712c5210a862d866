"""Where each LoRA slice's output columns start: one rule for every backend (torch and Triton ops,
the Punica wrappers), so that neither side imports the other for it."""
from __future__ import annotations

from typing import Optional, Sequence


def slice_offsets(n_sizes: Sequence[int], output_offsets: Optional[Sequence[int]] = None,
                  offset_start: int = 0) -> list[int]:
    """First output column of each slice: ``output_offsets`` when given (one per slice), else
    ``offset_start`` plus the running sum of the slice widths ``n_sizes``.

    Slices a fixed stride apart (the MoE LoRA ops' ``slice_stride``) are slices of that width:
    ``slice_offsets([stride] * S, None, start)``."""
    if output_offsets is not None:
        if len(output_offsets) != len(n_sizes):
            raise ValueError(f"{len(output_offsets)} output offsets for {len(n_sizes)} slices")
        return [int(o) for o in output_offsets]
    offs, acc = [], int(offset_start)
    for n in n_sizes:
        offs.append(acc)
        acc += int(n)
    return offs
