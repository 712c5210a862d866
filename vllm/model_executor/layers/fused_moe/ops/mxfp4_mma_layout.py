"""The MXFP4 words as the CUDA tensor-core kernel reads them (``csrc/capi/w4_mma_ptx.cuh``, ``decode_mx``).

The tiling is the int4 layout's (``int4_mma_layout``): [E, N/16, K/64, 32, 4] int32, lane l's word j holding
its four mma.sync A registers of the chunk's 16 x 16 tile j (register r: row g + 8 (r % 2), columns
2t + 8 (r // 2) and + 1, its first element in the low half).  What differs is where each e2m1 code's four
bits sit in the word.  The kernel turns register r into bf16 bits - sign at bit 15, exponent at 8-7,
mantissa at 6 of each half (the value * 2^-126; an HMUL2 by 2^126 restores it) - by rotating the word right
and masking.  Four rotations of that bit pattern cannot tile 32 bits, so registers 0 and 1 take all their
bits from one rotation each (26, 29) and registers 2 and 3 their exponent / mantissa bits from one (0, 7)
and their sign bits from another (27, 28): ``ROTATIONS``.  Target bit b of register r comes from word bit
(b + rotation) mod 32.

The scales are transposed once to [E, K/32, N] (uint8 e8m0), so that a stage's scale rows are 16-byte
pieces like the int4 scales.
"""
from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.ops.int4_mma_layout import fragment_positions

# per register: (rotation of the exponent / mantissa bits, rotation of the sign bits)
ROTATIONS = ((26, 26), (29, 29), (0, 27), (7, 28))
# code bit (0 mantissa, 1-2 exponent, 3 sign) -> bf16 bit within a half
_TARGET = (6, 7, 8, 15)


def source_bits() -> list[tuple[int, int, int, int]]:
    """(register, half, code bit, word bit) for all 32 bits of a word: the layout's table."""
    table = []
    for r, (rot_em, rot_s) in enumerate(ROTATIONS):
        for half in range(2):
            for bit in range(4):
                rot = rot_s if bit == 3 else rot_em
                table.append((r, half, bit, (_TARGET[bit] + 16 * half + rot) % 32))
    assert sorted(t[3] for t in table) == list(range(32)), "the layout must use every bit of a word once"
    return table


def codes_of_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[..., K/32, 16] uint8 blocks -> [..., K] uint8 e2m1 codes (low nibble first)."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1)  # [..., G, 16, 2]
    return codes.flatten(-3)


def repack_mxfp4_for_mma(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, K/32, 16] uint8 (the checkpoint's blocks) -> [E, N/16, K/64, 32, 4] int32 (above); one expert at
    a time."""
    E, N, G, _ = blocks.shape
    K = G * 32
    if N % 16 or K % 64:
        raise ValueError(f"the tensor-core MXFP4 layout needs N % 16 == 0 and K % 64 == 0, got N={N}, K={K}")
    rows, cols = fragment_positions(blocks.device)  # [32, 4 registers, 2 halves]
    table = source_bits()
    out = torch.empty(E, N // 16, K // 64, 32, 4, dtype=torch.int32, device=blocks.device)
    for e in range(E):
        tiles = codes_of_blocks(blocks[e]).reshape(N // 16, 16, K // 64, 4, 16)  # [nt, r16, kc, j, c16]
        code = tiles[:, rows, :, :, cols].to(torch.int64)  # [32, 4, 2, nt, kc, j]
        word = torch.zeros(code.shape[:1] + code.shape[3:], dtype=torch.int64, device=blocks.device)
        for r, half, bit, pos in table:
            word |= ((code[:, r, half] >> bit) & 1) << pos
        word = torch.where(word >= 2**31, word - 2**32, word)
        out[e] = word.permute(1, 2, 0, 3).to(torch.int32)  # [nt, kc, 32, j]
    return out


def unpack_mxfp4_mma(words: torch.Tensor) -> torch.Tensor:
    """The codes [E, N, K] (uint8) of [E, N/16, K/64, 32, 4] words: the layout's inverse, read from the table."""
    E, nt, kc = words.shape[:3]
    w = words.to(torch.int64) & 0xFFFFFFFF  # [E, nt, kc, 32, j]
    rows, cols = fragment_positions(words.device)
    code = torch.zeros(4, 2, *w.shape, dtype=torch.int64, device=words.device)
    for r, half, bit, pos in source_bits():
        code[r, half] |= ((w >> pos) & 1) << bit
    out = torch.empty(E, nt, 16, kc, 4, 16, dtype=torch.uint8, device=words.device)
    for r in range(4):
        for half in range(2):
            # code[r, half][e, nt, kc, lane, j] -> out[e, nt, rows[lane, r, half], kc, j, cols[lane, r, half]]
            out[:, :, rows[:, r, half], :, :, cols[:, r, half]] = code[r, half].permute(3, 0, 1, 2, 4).to(torch.uint8)
    return out.reshape(E, nt * 16, kc * 64)


def emulate_decode(words: torch.Tensor) -> torch.Tensor:
    """The kernel's ``decode_mx`` in torch, for the layout's tests: [..., 4] int32 words (one lane's chunk) ->
    [..., 4 tiles, 4 registers, 2 halves] float32 values (rotate, mask, read as bf16, times 2^126)."""
    w = words.to(torch.int64) & 0xFFFFFFFF

    def rotr(x: torch.Tensor, s: int) -> torch.Tensor:
        return ((x >> s) | (x << (32 - s))) & 0xFFFFFFFF if s else x

    mag, sign, everything = 0x01C001C0, 0x80008000, 0x81C081C0
    regs = torch.stack([rotr(w, 26) & everything, rotr(w, 29) & everything, (w & mag) | (rotr(w, 27) & sign),
                        (rotr(w, 7) & mag) | (rotr(w, 28) & sign)], dim=-1)  # [..., j, r]
    halves = torch.stack([regs & 0xFFFF, regs >> 16], dim=-1).to(torch.int32)  # bf16 bit patterns
    as_f32 = (halves << 16).view(torch.float32)  # bf16 -> fp32 is a 16-bit shift
    return as_f32 * 2.0**126
