"""The MoE LoRA delta on the experts' own alignment (prototype; launcher ``moe_lora_expert_blocks.py``).

``moe_lora_sorted_kernel`` needs the pairs grouped by (adapter slot, expert): a second alignment of
three launches in line before the w13 LoRA (~20-34 us a layer at 256 Qwen3-30B-A3B tokens).  Here a
program takes one M-block of the base GEMMs' expert alignment (every row one expert, rows of any slot)
and loops over the slots present among its rows: for each, the shrink of those rows (x of the others
masked to zero) with that slot's A, then per N tile the expand of those rows with that slot's B.  The
weights read are the same as the sorted kernel's while an expert's pairs fit one block (decode: at 256
tokens ~16 pairs an expert); the tensor-core work grows with the slots present (up to max_loras dots of
BLOCK_M rows instead of one) - the kernel is bound by memory.

Rows whose token has no slot, a disabled slot, or a padding entry get no delta and are not written.
``slot_groups`` = max_loras gives each (block, slot) a program of its own (the slots' rows are disjoint,
so their read-modify-writes are too): as many programs as the sorted kernel has, for parallelism; 1 loops
over every slot in one program.  Programs (M-block x slot group, slice group, N split) in one dimension
(``_grid_ids``); with ``slices_per_program``
> 1 the slices share A (``stride_as`` 0) and the one shrink is expanded into each.  The same numerics as
the sorted kernel (fp32 shrink, the bf16x3 expand of ``EXPAND_MODE`` 1).
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import (_add_tile, _grid_ids, _n_tile_range, _routed_weights,
                                                              _shrink_rows, _split_for_expand, expand_acc)
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _rows_of(slot, s):
    """The rows of slot ``s`` and whether there is any."""
    rows = slot == s
    return rows, tl.sum(rows.to(tl.int32), 0) > 0


@triton.jit
def moe_lora_expert_block_kernel(
    x_ptr, a_ptr, b_ptr, out_ptr, w_ptr,
    sorted_ids_ptr, block_expert_ids_ptr, num_post_padded_ptr, mapping_ptr, enabled_ptr,
    numel, top_k, top_k_in, K, N, R, max_loras,
    stride_xm, stride_xk,
    stride_as, stride_al, stride_ae, stride_ar, stride_ak,
    stride_bs, stride_bl, stride_be, stride_bn, stride_br,
    stride_ot, stride_oj, stride_on, out_col0, out_slice_cols,
    num_n_splits, num_slices, slices_per_program, slot_groups,
    MUL_ROUTED_WEIGHT: tl.constexpr, UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr,
    EXPAND_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pid_ml, pid_s, pid_n = _grid_ids(num_slices, num_n_splits)
    pid_m = pid_ml // slot_groups  # slot_groups = max_loras: one program per (block, slot); 1: every slot
    per_group = tl.cdiv(max_loras, slot_groups)
    s_begin = (pid_ml % slot_groups) * per_group
    s_end = tl.minimum(s_begin + per_group, max_loras)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    expert = tl.load(block_expert_ids_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    mask_m = pairs < numel
    slot = tl.load(mapping_ptr + pairs // top_k, mask=mask_m, other=-1).to(tl.int32)
    slot_ok = mask_m & (slot >= 0) & (slot < max_loras)
    on = tl.load(enabled_ptr + tl.where(slot_ok, slot, max_loras), mask=slot_ok, other=0)
    live = slot_ok & (on != 0) & (slot >= s_begin) & (slot < s_end)  # this program's slots only
    slot = tl.where(live, slot, -1)
    if tl.sum(live.to(tl.int32), 0) == 0:
        return

    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    slice0 = pid_s.to(tl.int64) * slices_per_program
    x_ptrs = x_ptr + (pairs // top_k_in)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_base = a_ptr + slice0 * stride_as + expert * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(s_begin, s_end):
        rows, present = _rows_of(slot, s)
        if present:  # the rows of other slots load x as zeros: each row sums its own slot's product
            acc += _shrink_rows(x_ptrs, a_base + s * stride_al, rows, mask_r, K, stride_xk, stride_ak, UPCAST,
                                FP32_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)

    hi, mid, lo = _split_for_expand(acc, EXPAND_MODE)
    w = _routed_weights(w_ptr, pairs, mask_m, MUL_ROUTED_WEIGHT)
    out_rows = out_ptr + (pairs // top_k) * stride_ot + (pairs % top_k) * stride_oj
    t_begin, t_end = _n_tile_range(pid_n, N, num_n_splits, BLOCK_N)
    for si in range(0, slices_per_program):
        col0 = out_col0 + (slice0 + si) * out_slice_cols
        b_base = b_ptr + (slice0 + si) * stride_bs + expert * stride_be + offs_r[:, None] * stride_br
        for t in range(t_begin, t_end):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(s_begin, s_end):
                rows, present = _rows_of(slot, s)
                if present:
                    b = tl.load(b_base + s * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn,
                                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
                    keep = rows[:, None]
                    delta = expand_acc(delta, tl.where(keep, hi, tl.zeros_like(hi)),
                                       tl.where(keep, mid, tl.zeros_like(mid)),
                                       tl.where(keep, lo, tl.zeros_like(lo)), b, UPCAST, FP32_PRECISION, EXPAND_MODE)
            _add_tile(out_rows, col0, offs_n, live, mask_n, delta, w, stride_on, MUL_ROUTED_WEIGHT)
