"""``moe_lora_pair_prefetch_kernel``: the MoE LoRA small-batch path (per pair, no alignment) in two
dependent memory round trips, a variant of ``moe_lora_pair_kernel`` behind ``fused_moe_lora.PAIR_KERNEL``
(off until timed on a GPU: ``benchmark_moe_lora.py --pair-kernel 1``).

The sm_90 compile of ``moe_lora_pair_kernel`` at one Qwen3-30B-A3B token has 8-9 dependent global
round trips per program (``lora_linear_static_report.py --moe``): the slot, then the enabled flag and a
branch on it, x through shared memory with a barrier per K tile, then one read-modify-write of ``out``
per N tile of the program's range.  Here one program owns one BLOCK_N tile of one slice of one pair:

* trip 1: the token's slot, the pair's expert, the x row (as a [1, BLOCK_K] row, so that it takes A's
  layout without a trip through shared memory), the out tile and the routed weight - none depends on
  another;
* trip 2: all of A (``K_TILES`` tiles of BLOCK_K; one at the launcher's tiles), B's tile and the slot's
  enabled flag, issued before any arithmetic; a disabled slot masks the store instead of branching.

(An ``expert_map`` adds one trip: the local id.)  ``OVERWRITE``: ``out`` is the seam's own fp32 delta buffer
(``experts/lora_overlap.py``): the tile is stored, not read and added to, and a pair without a delta (no adapter,
a disabled slot, a non-local expert) stores zeros, so that the buffer needs no zeroing launch.  The signature is ``moe_lora_pair_kernel``'s, so that
one argument dict launches either; the shrunk buffer, the N-split count and DO_SHRINK / DO_EXPAND are
unused (the launcher takes this kernel only for the fused op).
"""
import triton
import triton.language as tl

from vllm.lora.ops.triton_ops._fused_moe_lora_kernels import _grid_ids
from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def moe_lora_pair_prefetch_kernel(
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
    USE_PDL: tl.constexpr = False, OVERWRITE: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pair, slice_s, pid_n = _grid_ids(num_slices, num_n_splits)  # one N tile per program: num_n_splits = tiles
    pair = pair.to(tl.int64)
    slice_s = slice_s.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    token = pair // top_k

    # trip 1
    slot = tl.load(mapping_ptr + token).to(tl.int64)
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // top_k_in) * stride_xm
    xk = tl.load(x_row + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < K, other=0.0).to(tl.float32)
    o_ptrs = (out_ptr + token * stride_ot + (pair % top_k) * stride_oj
              + (out_col0 + slice_s * out_slice_cols + offs_n) * stride_on)
    if not OVERWRITE:
        o = tl.load(o_ptrs, mask=mask_n, other=0.0)
    if MUL_ROUTED_WEIGHT:
        wt = tl.load(w_ptr + pair).to(tl.float32)
    if HAS_EXPERT_MAP:
        local = tl.load(expert_map_ptr + tl.maximum(expert, 0)).to(tl.int64)
        expert = tl.where(expert >= 0, local, -1)
    if (slot < 0) | (slot >= max_loras) | (expert < 0) | (expert >= num_experts):
        if OVERWRITE:
            tl.store(o_ptrs, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=mask_n)
        return

    # trip 2
    on = tl.load(enabled_ptr + slot) != 0
    b = tl.load(b_ptr + slice_s * stride_bs + slot * stride_bl + expert * stride_be
                + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
    a_ptrs = (a_ptr + slice_s * stride_as + slot * stride_al + expert * stride_ae
              + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak)  # [BLOCK_R, BLOCK_K]
    a = tl.load(a_ptrs, mask=mask_r[:, None] & (offs_k[None, :] < K), other=0.0)
    acc2 = a.to(tl.float32) * xk
    for kt in tl.static_range(1, K_TILES):  # only when A does not fit one tile (large K or rank)
        k_left = K - kt * BLOCK_K
        xt = tl.load(x_row + (kt * BLOCK_K + offs_k[None, :]) * stride_xk, mask=offs_k[None, :] < k_left,
                     other=0.0).to(tl.float32)
        at = tl.load(a_ptrs + kt * BLOCK_K * stride_ak, mask=mask_r[:, None] & (offs_k[None, :] < k_left),
                     other=0.0)
        acc2 += at.to(tl.float32) * xt
    shrunk = tl.sum(acc2, axis=1)  # fp32 [BLOCK_R], kept in fp32 until multiplied by B
    if MUL_ROUTED_WEIGHT:
        shrunk = shrunk * wt
    delta = tl.sum(b.to(tl.float32) * shrunk[None, :], axis=1)
    if OVERWRITE:
        tl.store(o_ptrs, tl.where(on, delta, 0.0).to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=mask_n & on)
