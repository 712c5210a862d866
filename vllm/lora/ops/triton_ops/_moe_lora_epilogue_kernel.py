"""Private ``@triton.jit`` helper: the expand half of a MoE LoRA seam, inside a base grouped GEMM's epilogue.

The base GEMM's program holds an fp32 tile ``acc`` [BLOCK_M, BLOCK_N] of one expert's rows (pairs sorted by
expert, any adapters mixed).  ``lora_expand_epilogue`` adds to it, for each row, that row's LoRA delta:

    acc[i, j] += sum_r shrunk[slice(j), pair_i, r] * B[slice(j)][slot_i, expert, col_j - col0(slice), r]

where slot_i is the adapter slot of the row's token (``token_lora_mapping[pair // top_k]``); rows on no slot
(-1) or on a disabled one get nothing, and columns outside every slice get nothing.  Mixed adapters in one tile
take one small dot per slot present in it (a scalar test skips the others), per slice that overlaps the tile.
The shrink (``shrunk``, fp32; or ``NUM_PARTS`` partials of a shrink split along K, summed here in order) stays
fp32 until it is multiplied by B: ``expand_acc``'s bf16x3 split for a bf16
B (EXPAND_MODE 1), else an fp32 dot, as the standalone MoE LoRA kernels do.  Rows of ``shrunk`` that no slot
test selects are never read, so the buffer needs no initialisation there.
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _split_for_expand, expand_acc


@triton.jit
def lora_expand_epilogue(acc, pair, pair_ok, expert, cols, col_ok,
                         s_ptr, b_ptr, map_ptr, enabled_ptr, top_k, max_loras, R, n_slice, col0, slice_cols,
                         stride_sk, stride_ss, stride_sp, stride_sr,
                         stride_bs, stride_bl, stride_be, stride_bn, stride_br,
                         NUM_SLICES: tl.constexpr, BLOCK_R: tl.constexpr, EXPAND_MODE: tl.constexpr,
                         UPCAST: tl.constexpr, FP32_PRECISION: tl.constexpr, NUM_PARTS: tl.constexpr = 1):
    """``acc`` + the LoRA delta of its rows (see the module docstring).

    pair [BLOCK_M] int: flat pair ids (sentinel where ``pair_ok`` is false); expert: the tile's local expert;
    cols [BLOCK_N]: the GEMM output column of each ``acc`` column (``col_ok``: a real one).
    """
    token = tl.where(pair_ok, pair // top_k, 0).to(tl.int64)
    slot = tl.load(map_ptr + token, mask=pair_ok, other=-1)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    pair64 = tl.where(pair_ok, pair, 0).to(tl.int64)
    for sl in tl.static_range(NUM_SLICES):
        c = cols - (col0 + sl * slice_cols)
        in_slice = col_ok & (c >= 0) & (c < n_slice)
        c = tl.where(in_slice, c, 0).to(tl.int64)
        if tl.max(in_slice.to(tl.int32), axis=0) > 0:
            s_rows = s_ptr + sl * stride_ss + pair64[:, None] * stride_sp + offs_r[None, :] * stride_sr
            b_tile = b_ptr + sl * stride_bs + expert * stride_be + offs_r[:, None] * stride_br + c[None, :] * stride_bn
            for lo_slot in range(0, max_loras):
                rows = pair_ok & (slot == lo_slot)
                live = tl.max(rows.to(tl.int32), axis=0) * tl.load(enabled_ptr + lo_slot)
                if live != 0:
                    s_mask = rows[:, None] & r_ok[None, :]
                    sv = tl.load(s_rows, mask=s_mask, other=0.0)
                    for k in tl.static_range(1, NUM_PARTS):  # a split shrink's partials, summed in order
                        sv += tl.load(s_rows + k * stride_sk, mask=s_mask, other=0.0)
                    hi, mid, lo = _split_for_expand(sv, EXPAND_MODE)
                    b = tl.load(b_tile + lo_slot * stride_bl, mask=r_ok[:, None] & in_slice[None, :], other=0.0)
                    acc = expand_acc(acc, hi, mid, lo, b, UPCAST, FP32_PRECISION, EXPAND_MODE)
    return acc
