"""Private ``@triton.jit`` bodies of the dense LoRA op's split-K token path (``token_kernel = 2``;
launcher: ``lora_linear.py``).  Two launches, no atomics, no memset:

* ``lora_linear_split_shrink_kernel`` - grid (tokens, slices, K_SPLITS): program (t, s, j) multiplies
  x[t, K chunk j] by its slot's A[s] chunk ([BLOCK_R, BLOCK_K], loaded at once) and writes the fp32
  partial ``part[t, s, j, :]``.  Tokens without a valid slot write nothing.
* ``lora_linear_split_expand_kernel`` - grid (tokens, slices, cdiv(max N, BLOCK_N)): sums the token's
  K_SPLITS partials in a fixed order (deterministic), multiplies by B's tile and adds into y.  It reads
  partials only for tokens with a valid slot (exactly those the shrink wrote); a disabled slot is masked
  out of the store.

Each kernel spends two dependent memory round trips (the slot, then everything else), and A is read once
per token and slice in total (today's token kernel reads it once per N-split program).
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._lora_linear_kernels import _slice_params
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def lora_linear_split_shrink_kernel(
    x_ptr, a_ptr, part_ptr, mapping_ptr,
    K, R, max_loras,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_pt, stride_ps, stride_pj,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2)
    offs_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    slot = tl.load(mapping_ptr + t)
    # [1, BLOCK_K]: x takes A's layout (no shared-memory barrier between x's load and A's)
    xk = tl.load(x_ptr + t * stride_xt + offs_k[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
    if (slot < 0) | (slot >= max_loras):
        return
    a = tl.load(a_ptr + s * stride_as + slot.to(tl.int64) * stride_al + offs_r[:, None] * stride_ar
                + offs_k[None, :] * stride_ak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
    part = tl.sum(a.to(tl.float32) * xk.to(tl.float32), axis=1)  # fp32 [BLOCK_R]
    tl.store(part_ptr + t * stride_pt + s * stride_ps + j * stride_pj + offs_r, part)


@triton.jit
def lora_linear_split_expand_kernel(
    part_ptr, b_ptr, y_ptr, mapping_ptr, enabled_ptr,
    R, max_loras, k_splits,
    n0, n1, n2, off0, off1, off2,
    stride_pt, stride_ps, stride_pj,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_ENABLED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    N, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
    if pid_n * BLOCK_N >= N:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_j = tl.arange(0, BLOCK_J)
    slot = tl.load(mapping_ptr + t)
    y_ptrs = y_ptr + t * stride_yt + (col0 + offs_n).to(tl.int64) * stride_yn
    yv = tl.load(y_ptrs, mask=mask_n, other=0.0)
    if (slot < 0) | (slot >= max_loras):
        return
    slot = slot.to(tl.int64)
    s64 = s.to(tl.int64)
    b = tl.load(b_ptr + s64 * stride_bs + slot * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn
                + offs_r[None, :] * stride_br, mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    if HAS_ENABLED:
        on = tl.load(enabled_ptr + slot) != 0
    else:
        on = slot >= 0
    parts = tl.load(part_ptr + t * stride_pt + s64 * stride_ps + offs_j[:, None] * stride_pj + offs_r[None, :],
                    mask=(offs_j[:, None] < k_splits) & (offs_r[None, :] < BLOCK_R), other=0.0)  # [BLOCK_J, BLOCK_R]
    shrunk = tl.sum(parts, axis=0)  # fp32 [BLOCK_R], the K chunks summed in a fixed order
    delta = tl.sum(b.to(tl.float32) * shrunk[None, :], axis=1)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=mask_n & on)
