"""Private ``@triton.jit`` body of the decode GEMV with the dense LoRA expand in its epilogue (launcher:
``gemv_lora.py``).

``dense_gemv_lora_kernel`` - ``dense_gemv_kernel``'s grid, tiles and sums (``_dense_gemv_kernel.py``), and
before the rounding, for every token whose slot is in [0, L) and enabled: on each of the program's columns that
lies in slice s, the slice's delta ``sum_r B_s[slot, col - off_s, r] * shrunk_s[r]``, where ``shrunk_s`` is the
sum, in split order, of the split-K shrink's fp32 partials (``lora_linear_split_shrink_kernel``: [T, S,
K_SPLITS, BLOCK_R], written for exactly the tokens with a slot in [0, L)).  Base, bias and delta meet in fp32
and y is rounded once.  Tokens without an (enabled) slot, and columns in no slice, get exactly
``dense_gemv_kernel``'s result (the delta is selected in, never added as a zero).

The partials come from the previous launch, so they are read after the PDL wait, with the slots and B, before
the K loop: their round trips overlap the weight stream's.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._lora_linear_kernels import _slice_params
from vllm.model_executor.layers.ops._dense_gemv_kernel import _first_weight_tile, _gemv_sums
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _token_delta(m: tl.constexpr, M, offs_n, mask_n, part_ptr, b_ptr, map_ptr, enabled_ptr, R, max_loras,
                 k_splits, n0, n1, n2, off0, off1, off2, stride_pt, stride_ps, stride_pj, stride_bs, stride_bl,
                 stride_bn, stride_br, HAS_ENABLED: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Token m's delta on the program's columns (fp32 [BLOCK_N]) and where it applies ([BLOCK_N] bool: the
    token has an enabled slot in [0, L) and the column lies in a slice)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_J)
    slot = tl.load(map_ptr + m, mask=m < M, other=-1)
    ok = (slot >= 0) & (slot < max_loras)
    if HAS_ENABLED:
        ok = ok & (tl.load(enabled_ptr + slot, mask=ok, other=0) != 0)
    slot64 = tl.where(ok, slot, 0).to(tl.int64)
    delta = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cover = offs_n < 0
    for s in tl.static_range(NUM_SLICES):
        n_s, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
        j = offs_n - col0
        in_s = mask_n & (j >= 0) & (j < n_s)
        cover = cover | in_s
        parts = tl.load(part_ptr + m * stride_pt + s * stride_ps + offs_j[:, None] * stride_pj + offs_r[None, :],
                        mask=ok & (offs_j[:, None] < k_splits), other=0.0)  # [BLOCK_J, BLOCK_R]
        shrunk = tl.sum(parts, axis=0)  # fp32 [BLOCK_R]: the K chunks in a fixed order
        b = tl.load(b_ptr + s * stride_bs + slot64 * stride_bl + j[:, None].to(tl.int64) * stride_bn
                    + offs_r[None, :] * stride_br, mask=ok & in_s[:, None] & (offs_r[None, :] < R), other=0.0)
        delta += tl.sum(b.to(tl.float32) * shrunk[None, :], axis=1)
    return delta, cover & ok


@triton.jit
def dense_gemv_lora_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                           part_ptr, b_ptr, map_ptr, enabled_ptr, R, max_loras, k_splits,
                           n0, n1, n2, off0, off1, off2, stride_pt, stride_ps, stride_pj,
                           stride_bs, stride_bl, stride_bn, stride_br,
                           HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ENABLED: tl.constexpr,
                           NUM_SLICES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                           USE_PDL: tl.constexpr = False):
    offs_n, mask_n, offs_k, w_ptrs, w, mask_k = _first_weight_tile(w_ptr, stride_wn, N, K, EVEN_K, BLOCK_N, BLOCK_K)
    pdl_wait(USE_PDL)
    rows = tl.arange(0, BLOCK_M)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    apply = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
    for m in tl.static_range(BLOCK_M):
        d, on = _token_delta(m, M, offs_n, mask_n, part_ptr, b_ptr, map_ptr, enabled_ptr, R, max_loras, k_splits,
                             n0, n1, n2, off0, off1, off2, stride_pt, stride_ps, stride_pj, stride_bs, stride_bl,
                             stride_bn, stride_br, HAS_ENABLED, NUM_SLICES, BLOCK_N, BLOCK_R, BLOCK_J)
        delta = tl.where(rows[:, None] == m, d[None, :], delta)
        apply = tl.where(rows[:, None] == m, on[None, :], apply)
    acc = _gemv_sums(w, mask_k, w_ptrs, mask_n, offs_k, x_ptr, M, K, stride_xm, rows, EVEN_K, BLOCK_M, BLOCK_N,
                     BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(apply, acc + delta, acc)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & mask_n[None, :])
