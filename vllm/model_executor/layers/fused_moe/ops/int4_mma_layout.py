"""The int4 words as the CUDA tensor-core kernel reads them (``csrc/capi/int4_mma_moe.cu``).

``Int4PackedWeight.qweight`` ([E, K/8, N], code c of word [e, j, n] = q[e, n, 8j + c]) is repacked
once into [E, N/16, K/64, 32, 4] int32: for output tile nt (16 channels) and input chunk kc (64
inputs), lane l's 16 bytes are its four mma.sync A fragments (one word per 16 x 16 tile, tiles
j = 0..3 of the chunk).  The fragment of lane l = 4g + t holds, per the PTX ISA's m16n8k16 A layout
(register r: elements 2r and 2r + 1; rows g / g + 8, columns 2t, 2t + 1 / + 8):

    register 0: (row g,     cols 2t, 2t+1)      register 1: (row g + 8, cols 2t, 2t+1)
    register 2: (row g,     cols 2t+8, 2t+9)    register 3: (row g + 8, cols 2t+8, 2t+9)

and the kernel makes register r from nibbles r and r + 4 of the word ((word >> 4r) & 0x000F000F:
nibble r the low half, the register's first element).  So nibble r holds the first element of
register r and nibble r + 4 the second.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.int4_weights import unpack_int4_k

# nibble i of a lane's word: (row offset from g, column offset from 2t) in the 16 x 16 tile
_ROW = (0, 8, 0, 8, 0, 8, 0, 8)
_COL = (0, 0, 8, 8, 1, 1, 9, 9)


def _tile_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[32, 8] row and column (within the 16 x 16 tile) of nibble i of lane l."""
    lane = torch.arange(32, device=device)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    rows = g + torch.tensor(_ROW, device=device)[None, :]
    cols = 2 * t + torch.tensor(_COL, device=device)[None, :]
    return rows, cols


def repack_for_mma(qweight: torch.Tensor) -> torch.Tensor:
    """[E, K/8, N] int32 words (``Int4PackedWeight`` layout) -> [E, N/16, K/64, 32, 4] int32 (above).

    One expert at a time (the codes of one expert as uint8 are 2x the packed bytes of it)."""
    E, kw, N = qweight.shape
    K = kw * 8
    if N % 16 or K % 64:
        raise ValueError(f"the tensor-core int4 layout needs N % 16 == 0 and K % 64 == 0, got N={N}, K={K}")
    rows, cols = _tile_index(qweight.device)
    out = torch.empty(E, N // 16, K // 64, 32, 4, dtype=torch.int32, device=qweight.device)
    shifts = (4 * torch.arange(8, device=qweight.device, dtype=torch.int64))
    for e in range(E):
        q = unpack_int4_k(qweight[e].t())  # [N, K] uint8
        tiles = q.reshape(N // 16, 16, K // 64, 4, 16)  # [nt, r16, kc, j, c16]
        nib = tiles[:, rows, :, :, cols]  # [32, 8, nt, kc, j]: advanced indices first
        words = (nib.to(torch.int64) << shifts[None, :, None, None, None]).sum(dim=1)  # [32, nt, kc, j]
        words = torch.where(words >= 2**31, words - 2**32, words)
        out[e] = words.permute(1, 2, 0, 3).to(torch.int32)
    return out


def unpack_mma(words: torch.Tensor) -> torch.Tensor:
    """The codes [E, N, K] (uint8) of [E, N/16, K/64, 32, 4] words, read the way the kernel decodes them
    (register r = nibbles r and r + 4, placed by the PTX fragment layout): the layout's test inverse."""
    E, nt, kc = words.shape[:3]
    w = words.to(torch.int64) & 0xFFFFFFFF
    q = torch.empty(E, nt * 16, kc * 64, dtype=torch.uint8, device=words.device)
    lane = torch.arange(32, device=words.device)
    g, t = lane // 4, lane % 4
    for j in range(4):
        for reg in range(4):
            row = g + (8 if reg % 2 else 0)  # registers 1 and 3: row g + 8
            col = 2 * t + (8 if reg >= 2 else 0)  # registers 2 and 3: columns + 8
            for half in range(2):  # the register's first element (low half) = nibble reg, second = reg + 4
                nib = ((w[..., j] >> (4 * (reg + 4 * half))) & 0xF).to(torch.uint8)  # [E, nt, kc, 32]
                r = (torch.arange(nt, device=words.device) * 16)[:, None, None] + row[None, None, :]
                c = (torch.arange(kc, device=words.device) * 64 + 16 * j)[None, :, None] + col[None, None, :] + half
                q[:, r.expand(nt, kc, 32), c.expand(nt, kc, 32)] = nib
    return q


def fragment_positions(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[32, 4, 2] row and column (within the 16 x 16 tile) of lane l's register r, element h (the PTX m16n8k16 A
    layout above): what every 4-bit format's tensor-core layout places."""
    lane = torch.arange(32, device=device)[:, None, None]
    reg = torch.arange(4, device=device)[None, :, None]
    half = torch.arange(2, device=device)[None, None, :]
    rows = lane // 4 + 8 * (reg % 2) + 0 * half
    cols = 2 * (lane % 4) + 8 * (reg // 2) + half
    return rows, cols
