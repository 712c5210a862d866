"""Private ``@triton.jit`` body of the fused dense projection + LoRA op (launcher: ``fused_linear_lora.py``).

``fused_linear_lora_kernel`` - grid (N tiles,): one program owns BLOCK_N output
columns of every token (at most ``BLOCK_T`` = 16, padded rows masked: a dot
needs 16 rows) and writes them once:

1. base: acc [BLOCK_T, BLOCK_N] fp32 = x @ W^T over K in BLOCK_K steps (W read
   once in the whole grid: the memory-bound part);
2. bias, in fp32;
3. LoRA: for each slice whose columns meet the tile, for each slot that some
   token of the batch uses (and that is enabled): the shrink of those tokens'
   rows, x @ A[slice, slot]^T, fp32 [BLOCK_T, BLOCK_R] (other rows are zero),
   then its expand against B's rows of the tile's columns, added to acc
   (``_expand_dot``: the fp32 intermediate is never rounded to the input dtype);
4. one rounding into y.

With ``SHRINK_IN_LOOP`` the shrink of one (slice, slot) pair - the first slice
that meets the tile, the smallest slot in use - is accumulated inside the main K
loop, from the x tiles the base product loads anyway, so that its A loads are
pipelined with W's (at batch 1 that is the whole LoRA work of almost every
program); the other pairs run after the loop.  A token without an (enabled) slot
gets exactly the base (every delta row it sees is 0.0).  The shrink is recomputed
by every program that needs it (it reads R x K of A per slot and slice from L2;
W's tile is BLOCK_N x K).

``UPCAST`` (under ``TRITON_INTERPRET=1``) converts dot operands to fp32: the
interpreter's dot on bf16 multiplies raw bit patterns.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _dot, _expand_dot, _shrink_rows, _split_for_expand
from vllm.lora.ops.triton_ops._lora_linear_kernels import _slice_params


@triton.jit
def _slice_cols(s, n0, n1, n2, off0, off1, off2, offs_n, mask_n):
    """Column index inside slice s of each of the tile's columns (0 where masked), and the mask."""
    ns, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
    cols = offs_n - col0
    mask_c = mask_n & (cols >= 0) & (cols < ns)
    return tl.where(mask_c, cols, 0), mask_c


@triton.jit
def _add_expand(acc, shrunk, b_base, cols, mask_c, offs_r, mask_r, stride_bn, stride_br, UPCAST: tl.constexpr,
                FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """acc + shrunk [BLOCK_T, BLOCK_R] (fp32) @ B^T [BLOCK_R, BLOCK_N] of one (slice, slot)."""
    hi, mid, lo = _split_for_expand(shrunk, EXPAND_MODE)
    b_ptrs = b_base + offs_r[:, None] * stride_br + cols[None, :].to(tl.int64) * stride_bn
    b = tl.load(b_ptrs, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    return acc + _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_T, BLOCK_N)


@triton.jit
def _col_tile(pid_n, N, BLOCK_N: tl.constexpr):
    """Output columns of N tile ``pid_n``: its first, its end (at most N), their indices and mask."""
    n_begin = pid_n * BLOCK_N
    n_end = tl.minimum(n_begin + BLOCK_N, N)
    offs_n = n_begin + tl.arange(0, BLOCK_N)
    return n_begin, n_end, offs_n, offs_n < N


@triton.jit
def _row_slots(mapping_ptr, enabled_ptr, tok, mask, max_loras, HAS_ENABLED: tl.constexpr):
    """Each row's slot (of token ``tok``) where valid and enabled, else -1; and whether it is."""
    slots = tl.load(mapping_ptr + tok, mask=mask, other=-1)
    valid = (slots >= 0) & (slots < max_loras)
    if HAS_ENABLED:
        valid = valid & (tl.load(enabled_ptr + slots, mask=valid, other=0) != 0)
    return tl.where(valid, slots, -1), valid


@triton.jit
def _first_slice(n_begin, n_end, n0, n1, n2, off0, off1, off2, NUM_SLICES: tl.constexpr):
    """The first slice whose columns meet the tile's [n_begin, n_end) (-1: none)."""
    s0 = n_begin * 0 - 1
    for s in tl.static_range(NUM_SLICES):
        ns, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
        s0 = tl.where((s0 < 0) & (col0 < n_end) & (col0 + ns > n_begin), s, s0)
    return s0


@triton.jit
def _base_loop(acc, shrunk, x_ptrs, w_ptrs, a_ptrs, mask_rows, mask_n, a_cols_ok, shrink_rows, K,
               stride_xk, stride_wk, stride_ak, UPCAST: tl.constexpr, BASE_PRECISION: tl.constexpr,
               FP32_PRECISION: tl.constexpr, SHRINK: tl.constexpr, SELECT_ROWS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The main K loop: acc += x [rows, BLOCK_K] @ W^T [BLOCK_K, BLOCK_N] tiles (``x_ptrs``, ``w_ptrs``: the first
    ones); with ``SHRINK`` also shrunk += x @ A^T from the same x tiles (``a_ptrs``: the first A^T tile
    [BLOCK_K, columns], columns ``a_cols_ok`` loaded; ``SELECT_ROWS``: only rows ``shrink_rows``)."""
    offs_k = tl.arange(0, BLOCK_K)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_rows[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wt = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = _dot(xt, wt, acc, UPCAST, BASE_PRECISION)
        if SHRINK:
            at = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & a_cols_ok[None, :], other=0.0)
            if SELECT_ROWS:
                xt = tl.where(shrink_rows[:, None], xt, tl.zeros_like(xt))
            shrunk = _dot(xt, at, shrunk, UPCAST, FP32_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc, shrunk


@triton.jit
def _add_other_pairs(acc, x_ptrs0, a_ptr, b_ptr, slots, lid_begin, lid_end, in_loop, s0, loop_hi, n_begin, n_end,
                     n0, n1, n2, off0, off1, off2, offs_n, mask_n, offs_r, mask_r, K, stride_xk,
                     stride_as, stride_al, stride_ar, stride_ak, stride_bs, stride_bl, stride_bn, stride_br,
                     NUM_SLICES: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr,
                     EXPAND_MODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """acc + the delta of every (slice meeting the tile, slot in [lid_begin, lid_end) that a row holds) pair but
    those the main loop shrank (``in_loop``: slice s0, slots up to ``loop_hi``), in that order: the shrink
    re-reads the rows' x (``x_ptrs0``: the first x tile), then the expand."""
    zero64 = (n_begin * 0).to(tl.int64)  # makes slice / slot offsets 64-bit
    offs_k = tl.arange(0, BLOCK_K)
    for s in tl.static_range(NUM_SLICES):
        ns, col0 = _slice_params(s, n0, n1, n2, off0, off1, off2)
        if (col0 < n_end) & (col0 + ns > n_begin):  # the tile meets slice s
            cols, mask_c = _slice_cols(s, n0, n1, n2, off0, off1, off2, offs_n, mask_n)
            for lid in range(lid_begin, lid_end):
                rows = slots == lid
                done = in_loop & (lid <= loop_hi) & (s == s0)
                if (tl.max(rows.to(tl.int32), axis=0) > 0) & (~done):
                    a_base = a_ptr + (zero64 + s) * stride_as + (zero64 + lid) * stride_al
                    a_ptrs = a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # A^T tile
                    shrunk = _shrink_rows(x_ptrs0, a_ptrs, rows, mask_r, K, stride_xk, stride_ak, UPCAST,
                                          FP32_PRECISION, BLOCK_T, BLOCK_K, BLOCK_R)  # fp32, 0 in other rows
                    b_base = b_ptr + (zero64 + s) * stride_bs + (zero64 + lid) * stride_bl
                    acc = _add_expand(acc, shrunk, b_base, cols, mask_c, offs_r, mask_r, stride_bn, stride_br,
                                      UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_T, BLOCK_N)
    return acc


@triton.jit
def fused_linear_lora_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, mapping_ptr, enabled_ptr,
    T, N, K, R, max_loras,
    n0, n1, n2, off0, off1, off2,
    stride_xt, stride_xk, stride_wn, stride_wk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_ENABLED: tl.constexpr, NUM_SLICES: tl.constexpr, UPCAST: tl.constexpr,
    BASE_PRECISION: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
    SHRINK_IN_LOOP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    zero64 = (pid_n * 0).to(tl.int64)  # makes slice / slot offsets 64-bit (loop indices may be plain ints)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    n_begin, n_end, offs_n, mask_n = _col_tile(pid_n, N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    # the tokens whose slot is valid and enabled (-1 for the others)
    slots, valid = _row_slots(mapping_ptr, enabled_ptr, offs_t, mask_t, max_loras, HAS_ENABLED)

    # the (slice, slot) pair whose shrink runs inside the main loop: first slice meeting the tile, smallest slot
    slot0 = tl.min(tl.where(valid, slots, max_loras), axis=0)
    s0 = _first_slice(n_begin, n_end, n0, n1, n2, off0, off1, off2, NUM_SLICES)
    in_loop = (slot0 < max_loras) & (s0 >= 0) & SHRINK_IN_LOOP
    a0_base = a_ptr + (zero64 + tl.maximum(s0, 0)) * stride_as + (zero64 + tl.minimum(slot0, max_loras - 1)) * stride_al
    a0_ptrs = a0_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # [BLOCK_K, BLOCK_R]: A^T tile

    # 1. base GEMV/GEMM: x [BLOCK_T, BLOCK_K] @ W^T [BLOCK_K, BLOCK_N] (+ the in-loop shrink of slot0's rows)
    x_ptrs0 = x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc, shrunk0 = _base_loop(tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32),
                              tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32), x_ptrs0, w_ptrs, a0_ptrs, mask_t,
                              mask_n, mask_r & in_loop, slots == slot0, K, stride_xk, stride_wk, stride_ak, UPCAST,
                              BASE_PRECISION, FP32_PRECISION, SHRINK_IN_LOOP, True, BLOCK_K)

    # 2. bias
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # 3. LoRA delta: the in-loop pair, then every other (slice meeting the tile, slot in use) pair
    if in_loop:
        cols, mask_c = _slice_cols(s0, n0, n1, n2, off0, off1, off2, offs_n, mask_n)
        b_base = b_ptr + (zero64 + s0) * stride_bs + (zero64 + slot0) * stride_bl
        acc = _add_expand(acc, shrunk0, b_base, cols, mask_c, offs_r, mask_r, stride_bn, stride_br, UPCAST,
                          FP32_PRECISION, EXPAND_MODE, BLOCK_T, BLOCK_N)
    # (no row holds a slot below slot0: those pairs are skipped, so "up to slot0" is the in-loop pair)
    acc = _add_other_pairs(acc, x_ptrs0, a_ptr, b_ptr, slots, 0, max_loras, in_loop, s0, slot0, n_begin, n_end,
                           n0, n1, n2, off0, off1, off2, offs_n, mask_n, offs_r, mask_r, K, stride_xk,
                           stride_as, stride_al, stride_ar, stride_ak, stride_bs, stride_bl, stride_bn, stride_br,
                           NUM_SLICES, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_T, BLOCK_N, BLOCK_K, BLOCK_R)

    # 4. one rounding
    y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])
