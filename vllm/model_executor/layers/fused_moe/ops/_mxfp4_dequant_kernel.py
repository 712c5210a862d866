"""Private Triton body of the MXFP4 expert dequantiser (see ``mxfp4_expert_dequant.py``).

One program writes one [BLOCK_N, BLOCK_K] tile of one expert's dense weight from its
BLOCK_K / 2 code bytes per row (low nibble = even element) and BLOCK_K / 32 e8m0 scales per
row: value (exact in float32, decoded as the grouped GEMM does) times 2^(s - 127) (exact in
float32; s = 255 is inf, as torch's ``ldexp`` gives), rounded once to the output dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from vllm.model_executor.layers.fused_moe.ops._float_round import storage_value
from vllm.model_executor.layers.fused_moe.ops._mxfp4_moe_gemm_kernel import _e2m1_to_f32, _e8m0_to_f32


@triton.jit
def _mxfp4_dequant_kernel(
    q_ptr,  # [E, N, K/2] uint8 codes (the blocks, flattened per row)
    s_ptr,  # [E, N, K/32] uint8 e8m0 scales
    out_ptr,  # [e1 - e0, N, K] (any strides); int16 bits for bf16 (``_float_round.storage_view``)
    e0,
    N,
    K,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_oe,
    stride_on,
    stride_ok,
    OUT_KIND: tl.constexpr,  # 0 fp32, 1 fp16, 2 bf16 (``_float_round.out_kind``)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 32
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_e = tl.program_id(2).to(tl.int64)
    expert = e0 + pid_e

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # [BLOCK_N, BLOCK_K / 32 scale groups, 16 bytes]: one scale load per group, broadcast in registers
    offs_g = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    g_ok = n_ok[:, None] & (offs_g < K // 32)[None, :]
    exps = tl.load(s_ptr + expert * stride_se + offs_n[:, None] * stride_sn + offs_g[None, :], mask=g_ok,
                   other=127).to(tl.int32)
    scale = _e8m0_to_f32(exps)[:, :, None]
    offs_b = offs_g[:, None] * 16 + tl.arange(0, 16)[None, :]  # byte j holds elements 2j, 2j + 1
    codes = tl.load(q_ptr + expert * stride_qe + offs_n[:, None, None] * stride_qn + offs_b[None, :, :],
                    mask=g_ok[:, :, None], other=0).to(tl.int32)
    lo = storage_value(_e2m1_to_f32(codes & 0xF) * scale, OUT_KIND)
    hi = storage_value(_e2m1_to_f32(codes >> 4) * scale, OUT_KIND)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # [n, g, b, 0 / 1] -> [n, 32 g + 2 b + 0 / 1]

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = n_ok[:, None] & (offs_k < K)[None, :]
    out_ptrs = out_ptr + pid_e * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, w, mask=out_mask)
