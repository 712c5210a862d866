"""Private ``@triton.jit`` bodies of the dense LoRA op's sorted path as a split-K pair (``LoRALinearTileConfig.
sorted_split``; launcher: ``lora_linear.py``).  Two launches, no atomics, no memset:

* ``lora_linear_sorted_shrink_kernel`` - grid (M-blocks, slices, K_SPLITS) over the slot-sorted tokens (the
  blocks of ``lora_linear_sorted_kernel``): program (b, s, j) multiplies its block's rows of x, K chunk j, by
  the slot's A[s] chunk (one tensor-core dot) and writes the fp32 partial ``part[b, s, j, :, :]`` ([BLOCK_M,
  BLOCK_R], padding rows included).  Blocks past the last slot's, and blocks of a disabled slot, write nothing.
* ``lora_linear_sorted_expand_kernel`` - grid (M-blocks, slices, cdiv(max N, BLOCK_N)): sums its block's
  K_SPLITS partials (one fixed order), multiplies by B's tile (the bf16x3 split or a tf32x3 dot, ``EXPAND_MODE``,
  as the fused kernel) and adds into y.  It reads partials only of the blocks the shrink wrote.

Against ``lora_linear_sorted_kernel`` (every (block, slice, N-split) program walks all of K, so the shrink is
computed once per N-split and its K loop is the program's latency): each shrink program loads one K chunk
at once, and each expand program one N tile.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _expand_dot, _shrink_rows, _split_for_expand
from vllm.lora.ops.triton_ops._lora_linear_kernels import _block_tokens, _slice_params, _slot_block
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _live_block(pid_m, counts_ptr, sorted_ids_ptr, enabled_ptr, num_slots, num_tokens, HAS_ENABLED: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Block ``pid_m``'s slot, tokens and their mask (``_slot_block``, ``_block_tokens``: the tokens' load goes out
    beside the enabled flag's), and whether the block has work: a slot, enabled."""
    slot, first_block, row_begin, row_end = _slot_block(pid_m, counts_ptr, num_slots, BLOCK_M)
    live = slot >= 0
    tokens, mask_m = _block_tokens(pid_m, first_block, row_begin, row_end, sorted_ids_ptr, num_tokens, BLOCK_M)
    mask_m = mask_m & live
    if HAS_ENABLED:
        live = live & (tl.load(enabled_ptr + slot, mask=live, other=0) != 0)
    return slot, tokens, mask_m, live


@triton.jit
def lora_linear_sorted_shrink_kernel(
    x_ptr, a_ptr, part_ptr, sorted_ids_ptr, counts_ptr, enabled_ptr,
    num_tokens, K, R, num_slots,
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_pb, stride_ps, stride_pj, stride_pm,
    HAS_ENABLED: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k0 = j * BLOCK_K
    k_left = tl.minimum(K - k0, BLOCK_K)
    pdl_wait(USE_PDL)
    slot, tokens, mask_m, live = _live_block(pid_m, counts_ptr, sorted_ids_ptr, enabled_ptr, num_slots,
                                             num_tokens, HAS_ENABLED, BLOCK_M)
    if not live:
        return
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + (k0 + offs_k[None, :]) * stride_xk
    a_ptrs = (a_ptr + s * stride_as + slot.to(tl.int64) * stride_al + offs_r[None, :] * stride_ar
              + (k0 + offs_k[:, None]) * stride_ak)  # [BLOCK_K, BLOCK_R] view of A^T
    part = _shrink_rows(x_ptrs, a_ptrs, mask_m, offs_r < R, k_left, stride_xk, stride_ak,
                        UPCAST, FP32_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)  # one K step: fp32 [BLOCK_M, BLOCK_R]
    rows = tl.arange(0, BLOCK_M)
    tl.store(part_ptr + pid_m * stride_pb + s * stride_ps + j * stride_pj + rows[:, None] * stride_pm
             + offs_r[None, :], part)


@triton.jit
def lora_linear_sorted_expand_kernel(
    part_ptr, b_ptr, y_ptr, sorted_ids_ptr, counts_ptr, enabled_ptr,
    num_tokens, R, num_slots, k_splits,
    n0, n1, n2, off0, off1, off2,
    stride_pb, stride_ps, stride_pj, stride_pm,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_ENABLED: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    pid_n = tl.program_id(2)
    N, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
    s64 = s.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pdl_wait(USE_PDL)
    if pid_n * BLOCK_N >= N:
        return
    slot, tokens, mask_m, live = _live_block(pid_m, counts_ptr, sorted_ids_ptr, enabled_ptr, num_slots,
                                             num_tokens, HAS_ENABLED, BLOCK_M)
    if not live:
        return
    offs_j = tl.arange(0, BLOCK_J)
    rows = tl.arange(0, BLOCK_M)
    parts = tl.load(part_ptr + pid_m * stride_pb + s64 * stride_ps + offs_j[:, None, None] * stride_pj
                    + rows[None, :, None] * stride_pm + offs_r[None, None, :],
                    mask=(offs_j < k_splits)[:, None, None], other=0.0)  # [BLOCK_J, BLOCK_M, BLOCK_R]
    acc = tl.sum(parts, axis=0)  # fp32 [BLOCK_M, BLOCK_R]: the K chunks in a fixed order
    hi, mid, lo = _split_for_expand(acc, EXPAND_MODE)
    b = tl.load(b_ptr + s64 * stride_bs + slot.to(tl.int64) * stride_bl + offs_r[:, None] * stride_br
                + offs_n[None, :].to(tl.int64) * stride_bn, mask=(offs_r[:, None] < R) & mask_n[None, :],
                other=0.0)  # [BLOCK_R, BLOCK_N] view of B^T
    delta = _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N)
    y_ptrs = y_ptr + tokens[:, None] * stride_yt + (col0 + offs_n[None, :]).to(tl.int64) * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + delta).to(yv.dtype), mask=y_mask)
