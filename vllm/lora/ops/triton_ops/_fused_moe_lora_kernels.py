"""Private ``@triton.jit`` bodies of the MoE LoRA ops (launchers: ``fused_moe_lora.py``).

Two kernels, each able to run the shrink, the expand, or both fused
(``DO_SHRINK`` / ``DO_EXPAND``):

* ``moe_lora_sorted_kernel`` - programs (M-blocks, slices, N-splits) over the
  output of ``moe_lora_align_block_size``: one program takes one M-block of a
  single virtual expert (slot, local expert), computes its [BLOCK_M, BLOCK_R]
  shrink in fp32 with tensor-core dots, then expands its share of the N columns
  (of every slice, when the slices share A: ``slices_per_program``).  With
  ``EARLY_IDS`` the block's virtual id, the padded total and its pair ids load
  together before the early exits test them: one dependent round trip instead
  of three before the x rows.  Triton pipelines the expand loop's B tiles
  itself (cp.async); an expand that also
  loaded each tile's out rows one tile ahead in registers was timed slower on an
  H100 (thirty-fifth session: Qwen3-30B-A3B layer with LoRA 497.9 -> 501.6 us
  at 256 tokens, decode step at batch 256 x1.008; branch ``expand-prefetch``).
* ``moe_lora_pair_kernel`` - programs (pairs, slices, N-splits), no sorting: for
  batches so small that blocks would be mostly padding.  Broadcast-multiply and
  ``tl.sum`` (a dot needs 16 rows).

The shrink result stays fp32 until it has been multiplied by B.  A dot of the
fp32 intermediate with B can silently drop to tf32 on NVIDIA GPUs (10-bit
mantissa), so the expand uses one of (``EXPAND_MODE``):

* 1 ("bf16x3", B in bf16): the fp32 value is split into three bf16 terms
  hi + mid + lo (8 significant bits each, 24 together = fp32) and each is
  multiplied by B on the bf16 tensor cores with fp32 accumulation.  Exact up to
  fp32 rounding, three cheap MMAs, and B never leaves bf16.
* 0 (any B dtype): B is converted to fp32 and a fp32 dot runs with
  ``FP32_PRECISION`` = "tf32x3" on GPU (about fp32 accuracy on tensor cores) or
  "ieee" under the interpreter.

``UPCAST`` (set under ``TRITON_INTERPRET=1``) converts dot operands to fp32,
because the interpreter's dot on bf16 multiplies raw bit patterns.

Offsets that multiply a row/slot/expert index by a stride are 64-bit.  The grid is one-dimensional
(``_grid_ids``): the programs of one block or pair are adjacent.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def expand_acc(acc, hi, mid, lo, b, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr):
    """fp32 ``acc`` [BLOCK_M, BLOCK_N] + the [BLOCK_M, BLOCK_R] fp32 intermediate (its bf16 split hi + mid + lo
    with EXPAND_MODE 1, else ``hi`` itself) @ b [BLOCK_R, BLOCK_N]."""
    if EXPAND_MODE == 1:
        acc = _dot(lo, b, acc, UPCAST, FP32_PRECISION)
        acc = _dot(mid, b, acc, UPCAST, FP32_PRECISION)
        acc = _dot(hi, b, acc, UPCAST, FP32_PRECISION)
    else:
        acc = _dot(hi, b.to(tl.float32), acc, UPCAST, FP32_PRECISION)
    return acc


@triton.jit
def _expand_dot(hi, mid, lo, b, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_R] fp32 intermediate (or its bf16 split) @ b [BLOCK_R, BLOCK_N] -> fp32."""
    return expand_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), hi, mid, lo, b, UPCAST, FP32_PRECISION,
                      EXPAND_MODE)


@triton.jit
def _shrink_rows(x_ptrs, a_ptrs, mask_m, mask_r, K, stride_xk, stride_ak, UPCAST: tl.constexpr,
                 FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R] = rows of x @ A^T, walking K in BLOCK_K steps.

    x_ptrs: [BLOCK_M, BLOCK_K] pointers to the rows' first K tile; a_ptrs: [BLOCK_K, BLOCK_R]
    pointers to the first K tile of A^T.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        at = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = _dot(xt, at, acc, UPCAST, FP32_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _shrink_one_row(x_ptrs, a_ptrs, mask_r, K, stride_xk, stride_ak, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, K_TILES: tl.constexpr):
    """fp32 [BLOCK_R] = one row of x @ A^T without a dot (a dot needs 16 rows).

    x_ptrs: [BLOCK_K] pointers to the row's first K tile; a_ptrs: [BLOCK_R, BLOCK_K] pointers to A's.
    K_TILES = cdiv(K, BLOCK_K) is a constexpr and the loop is unrolled, so all loads of A are
    issued before the first one returns: one row is latency-bound, and a rolled loop would pay
    one memory round trip per K tile.  Element-wise fp32 partial products, reduced once at the end.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for kt in tl.static_range(K_TILES):
        k_left = K - kt * BLOCK_K
        xk = tl.load(x_ptrs + kt * BLOCK_K * stride_xk, mask=offs_k < k_left, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs + kt * BLOCK_K * stride_ak, mask=mask_r[:, None] & (offs_k[None, :] < k_left),
                    other=0.0).to(tl.float32)
        acc2 += a * xk[None, :]
    return tl.sum(acc2, axis=1)


@triton.jit
def _split_for_expand(acc, EXPAND_MODE: tl.constexpr):
    """(hi, mid, lo): three bf16 terms summing to the fp32 ``acc`` (EXPAND_MODE 1), else acc three times."""
    if EXPAND_MODE == 1:
        hi = acc.to(tl.bfloat16)
        rest = acc - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        return hi, mid, lo
    else:
        return acc, acc, acc


@triton.jit
def _n_tile_range(pid_n, N, num_n_splits, BLOCK_N: tl.constexpr):
    """The N tiles [begin, end) that N-split ``pid_n`` expands."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_n_splits)
    t_begin = pid_n * per_split
    return t_begin, tl.minimum(t_begin + per_split, n_tiles)


@triton.jit
def _grid_ids(num_slices, num_n_splits):
    """(row block or pair, slice, N split) of this program in the one-dimensional grid of the one-launch
    kernels: the programs of one row block / pair are adjacent, so those that read its A (shared by the slices
    of a fused gate_up adapter, ``stride_as`` 0) and its x rows run together and find them in L2."""
    pid = tl.program_id(0)
    per_row = num_slices * num_n_splits
    return pid // per_row, (pid % per_row) // num_n_splits, pid % num_n_splits


@triton.jit
def moe_lora_sorted_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, shrunk_ptr, w_ptr,
    sorted_ids_ptr, block_vids_ptr, num_post_padded_ptr,
    numel, top_k, top_k_in, K, N, R, num_experts,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_be, stride_bn, stride_br,
    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
    stride_ss, stride_sp, stride_sr, num_n_splits, num_slices, slices_per_program,
    DO_SHRINK: tl.constexpr, DO_EXPAND: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, EXPAND_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr = False, EARLY_IDS: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_m, pid_s, pid_n = _grid_ids(num_slices, num_n_splits)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    vid = tl.load(block_vids_ptr + pid_m)
    if EARLY_IDS:
        # the padded total and the block's pair ids in the virtual id's round trip, tested after (every block of
        # the grid has its BLOCK_M ids in the alignment's buffer, so the loads stay in bounds).  The ids join the
        # test (a real block's are >= 0, so the term never decides) so that the compiler cannot sink their load
        # past the exit
        padded = tl.load(num_post_padded_ptr)
        pairs = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        if (vid < 0) | (pid_m * BLOCK_M >= padded) | (tl.min(pairs, axis=0) < 0):
            return
    else:
        if vid < 0:
            return
        if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
            return
        pairs = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    slot = (vid // num_experts).to(tl.int64)
    expert = (vid % num_experts).to(tl.int64)
    mask_m = pairs < numel
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # the program's first slice; with slices_per_program > 1 (the slices share A: stride_as 0) the one shrink
    # is expanded into each of them
    slice_s = pid_s.to(tl.int64) * slices_per_program

    if DO_SHRINK:
        rows = pairs // top_k_in
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        a_ptrs = (a_ptr + slice_s * stride_as + slot * stride_al + expert * stride_ae
                  + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak)  # [BLOCK_K, BLOCK_R] view of A^T
        acc = _shrink_rows(x_ptrs, a_ptrs, mask_m, mask_r, K, stride_xk, stride_ak, UPCAST, FP32_PRECISION,
                           BLOCK_M, BLOCK_K, BLOCK_R)
    else:
        s_ptrs = shrunk_ptr + slice_s * stride_ss + pairs[:, None] * stride_sp + offs_r[None, :] * stride_sr
        acc = tl.load(s_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)

    if DO_EXPAND:
        hi, mid, lo = _split_for_expand(acc, EXPAND_MODE)
        if MUL_ROUTED_WEIGHT:
            w = tl.load(w_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)
        out_rows = out_ptr + (pairs // top_k) * stride_ot + (pairs % top_k) * stride_oj
        t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
        for si in range(0, slices_per_program):
            col0 = out_col0 + (slice_s + si) * out_slice_cols
            b_base = (b_ptr + (slice_s + si) * stride_bs + slot * stride_bl + expert * stride_be
                      + offs_r[:, None] * stride_br)
            for t in range(t_begin, t_end):
                offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
                mask_n = offs_n < N
                b = tl.load(b_base + offs_n[None, :].to(tl.int64) * stride_bn,
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                delta = _expand_dot(hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE, BLOCK_M, BLOCK_N)
                if MUL_ROUTED_WEIGHT:
                    delta = delta * w[:, None]
                o_ptrs = out_rows[:, None] + (col0 + offs_n[None, :]) * stride_on
                o_mask = mask_m[:, None] & mask_n[None, :]
                o = tl.load(o_ptrs, mask=o_mask, other=0.0)
                tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=o_mask)
    else:
        s_ptrs = shrunk_ptr + slice_s * stride_ss + pairs[:, None] * stride_sp + offs_r[None, :] * stride_sr
        tl.store(s_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _pair_route(topk_ids_ptr, mapping_ptr, enabled_ptr, expert_map_ptr, pair, top_k, max_loras, num_experts,
                HAS_EXPERT_MAP: tl.constexpr):
    """(live, slot, local expert) of one (token, expert) pair of the small-batch path: live when its token's
    adapter slot is in range and enabled and the expert is local."""
    slot = tl.load(mapping_ptr + pair // top_k).to(tl.int64)
    in_range = (slot >= 0) & (slot < max_loras)
    slot = tl.where(in_range, slot, max_loras)  # max_loras: the always-0 entry
    enabled = tl.load(enabled_ptr + slot)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    if HAS_EXPERT_MAP:
        local = tl.load(expert_map_ptr + tl.maximum(expert, 0)).to(tl.int64)
        expert = tl.where(expert >= 0, local, -1)
    live = (enabled != 0) & in_range & (expert >= 0) & (expert < num_experts)
    return live, slot, expert


@triton.jit
def _expand_one_row(acc, b_ptr, out_ptr, w_ptr, pair, slice_s, slot, expert, pid_n, top_k, N, num_n_splits,
                    offs_r, mask_r, stride_bs, stride_bl, stride_be, stride_bn, stride_br,
                    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
                    MUL_ROUTED_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[pair's row, this N-split's columns of the slice] += (acc [BLOCK_R] fp32 (x router weight)) @ B^T,
    without a dot: a read-modify-write per N tile."""
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(w_ptr + pair).to(tl.float32)
    out_row = out_ptr + (pair // top_k) * stride_ot + (pair % top_k) * stride_oj
    col0 = out_col0 + slice_s * out_slice_cols
    b_base = b_ptr + slice_s * stride_bs + slot * stride_bl + expert * stride_be + offs_r[None, :] * stride_br
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for t in range(t_begin, t_end):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * stride_bn, mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_R]
        delta = tl.sum(b * acc[None, :], axis=1)
        o_ptrs = out_row + (col0 + offs_n) * stride_on
        o = tl.load(o_ptrs, mask=mask_n, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=mask_n)


@triton.jit
def moe_lora_pair_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, shrunk_ptr, w_ptr,
    topk_ids_ptr, mapping_ptr, enabled_ptr, expert_map_ptr,
    numel, top_k, top_k_in, K, N, R, num_experts, max_loras,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_be, stride_bn, stride_br,
    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
    stride_ss, stride_sp, stride_sr, num_n_splits, num_slices,
    HAS_EXPERT_MAP: tl.constexpr, DO_SHRINK: tl.constexpr, DO_EXPAND: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_TILES: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pair, slice_s, pid_n = _grid_ids(num_slices, num_n_splits)
    pair = pair.to(tl.int64)
    slice_s = slice_s.to(tl.int64)
    live, slot, expert = _pair_route(topk_ids_ptr, mapping_ptr, enabled_ptr, expert_map_ptr, pair, top_k, max_loras,
                                     num_experts, HAS_EXPERT_MAP)
    if ~live:
        return

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if DO_SHRINK:
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + (pair // top_k_in) * stride_xm + offs_k * stride_xk
        a_ptrs = (a_ptr + slice_s * stride_as + slot * stride_al + expert * stride_ae
                  + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak)  # [BLOCK_R, BLOCK_K]
        acc = _shrink_one_row(x_ptrs, a_ptrs, mask_r, K, stride_xk, stride_ak, BLOCK_K, BLOCK_R, K_TILES)
    else:
        acc = tl.load(shrunk_ptr + slice_s * stride_ss + pair * stride_sp + offs_r * stride_sr, mask=mask_r,
                      other=0.0)

    if DO_EXPAND:
        _expand_one_row(acc, b_ptr, out_ptr, w_ptr, pair, slice_s, slot, expert, pid_n, top_k, N, num_n_splits,
                        offs_r, mask_r, stride_bs, stride_bl, stride_be, stride_bn, stride_br,
                        stride_ot, stride_oj, stride_on, out_col0, out_slice_cols, MUL_ROUTED_WEIGHT, BLOCK_N)
    else:
        tl.store(shrunk_ptr + slice_s * stride_ss + pair * stride_sp + offs_r * stride_sr, acc, mask=mask_r)
