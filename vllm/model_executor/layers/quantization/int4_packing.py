"""Unpacking int4 codes from the int32 words that GPTQ, AWQ and compressed-tensors store.

Every format packs eight 4-bit codes into one int32; "code k of a word" is bits
4k..4k+3.  They differ only in which matrix dimension is packed and in which
order the eight codes of a word map to columns:

- sequential (GPTQ, compressed-tensors): code k of word j is column 8j + k;
- AWQ: code k of word j is column 8j + AWQ_ORDER[k].

The format modules (``gptq.py``, ``awq.py``, ``compressed_tensors.py``) turn the
unpacked codes into an ``Int4Weight``.
"""
from __future__ import annotations

import torch

#: AWQ's nibble order: code k of a word holds column 8j + AWQ_ORDER[k]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# column 8j + c is code _AWQ_INVERSE[c] of word j
_AWQ_INVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_int4(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., 8n]: code k of word j at position 8j + k (sequential order)."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed int4 words must be int32, got {words.dtype}")
    codes = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF  # arithmetic shift; the mask drops the sign
    return codes.to(torch.uint8).reshape(*words.shape[:-1], words.shape[-1] * 8)


def unpack_int4_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., 8n] in column order, from AWQ's interleaved nibble order."""
    codes = unpack_int4(words)
    n = words.shape[-1]
    index = (torch.arange(n, device=words.device).unsqueeze(-1) * 8
             + torch.tensor(_AWQ_INVERSE, device=words.device)).reshape(-1)
    return codes[..., index]


def check_packed_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    """A clear error when a stored tensor's shape disagrees with the others of its module."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: {what} has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
                         "from the module's other tensors; the checkpoint is inconsistent")


def check_group_size(fmt: str, name: str, in_features: int, group_size: int) -> int:
    """The group size in channels (-1 = the whole input); refuses one that does not divide the input."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{fmt} module {name!r}: group size {group_size} does not divide the input dimension "
                         f"{in_features}; only group sizes that divide every quantized module's input "
                         "dimension are supported (or -1, one group per row)")
    return group_size
