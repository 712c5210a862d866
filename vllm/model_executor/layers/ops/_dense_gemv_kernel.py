"""Private ``@triton.jit`` body of the dense decode GEMV (launcher: ``dense_gemv.py``).

``dense_gemv_kernel`` - grid (N tiles,): one program owns BLOCK_N output columns (rows of W, [N, K] with K
contiguous) of every token (at most BLOCK_M) and walks K in BLOCK_K steps: each step loads its [BLOCK_N,
BLOCK_K] tile of W once (the memory-bound part: W is read once in the whole grid), then for each token the
fp32 products with that token's x are summed over the step's K, and added to the token's row of the fp32
accumulator; bias in fp32, one rounding.  A token's sums never depend on BLOCK_M or on the other tokens (same
tile, same reduction), so a row's output is the same whatever the batch it runs in (eager or a padded CUDA
graph batch).  With SHRINK the grid has programs past its ``n_tiles``: each writes the LoRA shrink of one (token,
slice, K chunk) of x for the projection's pending delta (``pending_delta.py``), its slot and A chunk loaded before
the PDL wait.

``dense_gemv_delayed_kernel`` - the same grid and tiles, for at most 4 tokens, but each token keeps its own
fp32 [BLOCK_N, BLOCK_K] partial products across the K-steps and reduces them once at the end, instead of
summing over every K-step (cross-thread reductions per step and token).  Its sums are ordered differently from
``dense_gemv_kernel``'s; a token's bits again never depend on the batch."""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait
from vllm.model_executor.layers.ops._pending_delta import pending_shrink, pending_shrink_operands


@triton.jit
def _weight_step(w_ptrs, mask_n, offs_k, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of W at K offset k0 (fp32) and the step's K mask."""
    if EVEN_K:
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        mask_k = offs_k < BLOCK_K
    else:
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return w.to(tl.float32), mask_k


@triton.jit
def _token_sums(acc, w, mask_k, x_ptr, M, stride_xm, k0, offs_k, rows, BLOCK_M: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + each token's sums of W tile * x over this K-step."""
    for m in tl.static_range(BLOCK_M):
        xm = tl.load(x_ptr + m * stride_xm + k0 + offs_k, mask=mask_k & (m < M), other=0.0).to(tl.float32)
        part = tl.sum(w * xm[None, :], axis=1)  # [BLOCK_N]: token m's sums over this K-step
        acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    return acc


@triton.jit
def _first_weight_tile(w_ptr, stride_wn, N, K, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """This program's output columns (rows of W), their mask, the K offsets, the W tile pointers and the
    first K-step's tile with its K mask: what a GEMV program loads before its PDL wait (no kernel writes W)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    w, mask_k = _weight_step(w_ptrs, mask_n, offs_k, 0, K, EVEN_K, BLOCK_K)
    return offs_n, mask_n, offs_k, w_ptrs, w, mask_k


@triton.jit
def _gemv_sums(w, mask_k, w_ptrs, mask_n, offs_k, x_ptr, M, K, stride_xm, rows, EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: every token's products with the program's W rows, summed K-step by K-step from
    the first tile (``_first_weight_tile``'s) on."""
    acc = _token_sums(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), w, mask_k, x_ptr, M, stride_xm, 0, offs_k,
                      rows, BLOCK_M)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_ptrs += BLOCK_K
        w, mask_k = _weight_step(w_ptrs, mask_n, offs_k, k0, K, EVEN_K, BLOCK_K)
        acc = _token_sums(acc, w, mask_k, x_ptr, M, stride_xm, k0, offs_k, rows, BLOCK_M)
    return acc


@triton.jit
def dense_gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
                      n_tiles=0, sa_ptr=None, stride_sas=0, stride_sal=0, stride_sar=0, stride_sak=0,
                      sp_ptr=None, stride_spt=0, stride_sps=0, stride_spj=0, smap_ptr=None, s_slices=1, s_splits=1,
                      s_rank=0, s_loras=0, SHRINK: tl.constexpr = False, S_BLOCK_R: tl.constexpr = 16,
                      S_BLOCK_K: tl.constexpr = 16):
    # The first K-step's W tile is loaded before the PDL wait (no kernel writes W): with PDL those loads
    # overlap the previous kernel's tail.  The sums' order is the loop's, step by step.
    offs_n, mask_n, offs_k, w_ptrs, w, mask_k = _first_weight_tile(w_ptr, stride_wn, N, K, EVEN_K, BLOCK_N, BLOCK_K)
    if SHRINK:  # programs past the N tiles: the LoRA shrink of x (ops/pending_delta.py), slot and A chunk first
        pid = tl.program_id(0)
        t, s, j, offs_sk, sk_ok, on_s, a_s = pending_shrink_operands(
            pid, n_tiles, pid >= n_tiles, smap_ptr, s_slices, s_splits, s_loras, sa_ptr, stride_sas, stride_sal,
            stride_sar, stride_sak, s_rank, K, S_BLOCK_R, S_BLOCK_K)
    pdl_wait(USE_PDL)
    if SHRINK:
        if pid >= n_tiles:
            xk = tl.load(x_ptr + t * stride_xm + offs_sk, mask=sk_ok, other=0.0).to(tl.float32)
            pending_shrink(sp_ptr, stride_spt, stride_sps, stride_spj, on_s, t, s, j, a_s, xk, S_BLOCK_R)
            return
    rows = tl.arange(0, BLOCK_M)
    acc = _gemv_sums(w, mask_k, w_ptrs, mask_n, offs_k, x_ptr, M, K, stride_xm, rows, EVEN_K, BLOCK_M, BLOCK_N,
                     BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & mask_n[None, :])


@triton.jit
def _row_fma(acc, w, x_tile, m: tl.constexpr, M, stride_xm, k0, mask_k):
    """acc [BLOCK_N, BLOCK_K] + W tile * token m's x over this K-step (0 for a row at or past M).  ``x_tile``
    repeats one row's K offsets over the tile's rows (``tl.broadcast_to``): the load then takes the W tile's
    layout (each thread loads the values its columns need), where a [BLOCK_K] load would be converted through
    shared memory, with barriers, every K-step."""
    xm = tl.load(x_tile + m * stride_xm + k0, mask=mask_k & (m < M), other=0.0).to(tl.float32)
    return acc + w * xm


@triton.jit
def _row_store(acc, bias, m: tl.constexpr, M, y_ptr, stride_ym, offs_n, mask_n, HAS_BIAS: tl.constexpr):
    """Token m's outputs: its partial products summed over K, + bias, one rounding."""
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += bias
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n & (m < M))


@triton.jit
def dense_gemv_delayed_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                              HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_tile = x_ptr + tl.broadcast_to(offs_k[None, :], (BLOCK_N, BLOCK_K))
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            mask_k = tl.broadcast_to((offs_k < BLOCK_K)[None, :], (BLOCK_N, BLOCK_K))
        else:
            mask_k = tl.broadcast_to(((k0 + offs_k) < K)[None, :], (BLOCK_N, BLOCK_K))
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k, other=0.0)
        w = w.to(tl.float32)
        acc0 = _row_fma(acc0, w, x_tile, 0, M, stride_xm, k0, mask_k)
        if BLOCK_M > 1:
            acc1 = _row_fma(acc1, w, x_tile, 1, M, stride_xm, k0, mask_k)
        if BLOCK_M > 2:
            acc2 = _row_fma(acc2, w, x_tile, 2, M, stride_xm, k0, mask_k)
            acc3 = _row_fma(acc3, w, x_tile, 3, M, stride_xm, k0, mask_k)
        w_ptrs += BLOCK_K
    bias = tl.load(bias_ptr + offs_n, mask=mask_n & HAS_BIAS, other=0.0).to(tl.float32)
    _row_store(acc0, bias, 0, M, y_ptr, stride_ym, offs_n, mask_n, HAS_BIAS)
    if BLOCK_M > 1:
        _row_store(acc1, bias, 1, M, y_ptr, stride_ym, offs_n, mask_n, HAS_BIAS)
    if BLOCK_M > 2:
        _row_store(acc2, bias, 2, M, y_ptr, stride_ym, offs_n, mask_n, HAS_BIAS)
        _row_store(acc3, bias, 3, M, y_ptr, stride_ym, offs_n, mask_n, HAS_BIAS)
