"""The packed PTX e2m1 -> bf16 decode of the MXFP4 kernel, run on the CPU by a small emulator
of the PTX instructions it uses (and, or, shl, shr, mov, prmt), on every byte value in every
position of the 32-bit word; and on the GPU through the kernel against the portable decode."""
import re
import struct

import pytest
import torch

from vllm.kernel_configs.tile_config import Mxfp4TileConfig
from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import _E2M1_TO_BF16_ASM
from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import E2M1_VALUES

_MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32, default mode: selector nibble i picks byte (sel & 7) of {b, a}; sel & 8 replicates its msb."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    regs = dict(inputs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & _MASK if re.fullmatch(r"0x[0-9A-Fa-f]+|\d+", tok) else regs[tok]

    body = asm.strip().strip("{}")
    for stmt in body.split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        d, *src = [t.strip() for t in args.split(",")]
        v = [val(t) for t in src]
        if op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "shl.b32":
            r = (v[0] << v[1]) & _MASK
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "mov.b32":
            r = v[0]
        elif op == "prmt.b32":
            r = _prmt(*v)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[d] = r
    return regs


def _bf16(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def test_packed_decode_gives_every_code_in_every_position():
    words = [int.from_bytes(bytes([(b + 64 * i) % 256 for i in range(4)]), "little") for b in range(256)]
    words += [int.from_bytes(bytes([b] * 4), "little") for b in range(256)]
    for w in words:
        out = run_ptx(_E2M1_TO_BF16_ASM.value, {"$4": w})
        halves = {"lo": [out["$0"] & 0xFFFF, out["$0"] >> 16, out["$1"] & 0xFFFF, out["$1"] >> 16],
                  "hi": [out["$2"] & 0xFFFF, out["$2"] >> 16, out["$3"] & 0xFFFF, out["$3"] >> 16]}
        for i in range(4):
            byte = (w >> (8 * i)) & 0xFF
            for name, code in (("lo", byte & 0xF), ("hi", byte >> 4)):
                got, want = _bf16(halves[name][i]), E2M1_VALUES[code]
                # repr tells -0.0 from 0.0
                assert repr(got) == repr(want), f"byte {byte:#04x} position {i} {name}: {got} != {want}"


@pytest.mark.cuda
@pytest.mark.parametrize("decode_asm", [1, 0])
def test_bf16_kernel_decodes_exactly_with_and_without_asm(decode_asm):
    """bf16 identity activations: every output is one dequantised weight, exact in bf16."""
    from tests.kernels.test_mxfp4_moe_gemm import _run_kernel, all_codes_blocks, extreme_scales
    from vllm.model_executor.layers.fused_moe.ops.mxfp4_dequant import dequantize_mxfp4

    gen = torch.Generator().manual_seed(4)
    E, N, K = 2, 64, 256
    blocks = all_codes_blocks(E, N, K, gen).cuda()
    scales = extreme_scales(E, N, K, gen).cuda()
    w = dequantize_mxfp4(blocks, scales)
    for e in range(E):
        ids = torch.full((K, 1), e, dtype=torch.int32, device="cuda")
        out = _run_kernel(torch.eye(K, device="cuda", dtype=torch.bfloat16), blocks, scales, ids, top_k_in=1,
                          config=Mxfp4TileConfig(16, 64, 128, decode_asm=decode_asm))
        assert torch.equal(out.float().abs(), w[e].t().abs())
