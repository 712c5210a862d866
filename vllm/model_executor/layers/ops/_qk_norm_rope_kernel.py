"""Private Triton body of the fused q/k norm + rotary embedding (launcher: ``qk_norm_rope.py``).

Grid (tokens, 2): program (t, 0) handles every query head of token t, (t, 1) every key head; with
WRITE_KV (tokens, 3): (t, 1) also stores its rotated keys into the paged KV cache at token t's slot and
(t, 2) stores token t's values there (clipped with CLIP), as the attention's KV write would.  The
heads of one token are one tile of [NH_P heads, HALF_P columns] for each rotary half (x1 = columns
[0, R/2), x2 = [R/2, R)) plus a [NH_P, PASS_P] tile of the columns past ``rotary_dim`` that pass
through (HAS_PASS).  NORM: 0 none, 1 RMSNorm over each head (Qwen3), 2 RMSNorm over all the heads of
the row (OLMoE).  Every step is rounded to the activation dtype where the torch reference rounds
(normed value, weight product, cos / sin, each rotary product and sum), so both paths agree to the
last bit except for the order of the sum of squares.
DELTA (a pending q/k/v LoRA delta, ``pending_delta.py``): the q heads are split over Q_GROUPS programs of
``q_heads`` heads each (axis 1: q groups, then k, then v), each adds its slice's delta to the heads it loads
(rounded once) before the norms, and program (t, Q_GROUPS + 1) adds v's delta to the values in place (and stores
them into the cache with WRITE_KV); the token's slot and the B rows of its heads load before the PDL wait.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait
from vllm.model_executor.layers.ops._pending_delta import pending_apply, pending_b, pending_slot


@triton.jit
def _rope_rows(pos_ptr, cos_ptr, sin_ptr, t, MAX_POS, stride_cos, c1, c_ok):
    """Token t's fp32 cos / sin rows at its position."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), MAX_POS - 1)  # memory safety only: positions are validated upstream
    cos = tl.load(cos_ptr + pos * stride_cos + c1, mask=c_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cos + c1, mask=c_ok, other=0.0)
    return cos, sin


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
    NQ, NK, HEAD_DIM, HALF, MAX_POS, eps, clip,
    stride_q, stride_k, stride_qo, stride_ko, stride_cos,
    NORM: tl.constexpr, CLIP: tl.constexpr, HAS_PASS: tl.constexpr,
    NH_P: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr, USE_PDL: tl.constexpr = False,
    v_ptr=None, cache_ptr=None, slot_ptr=None, stride_v=0, CACHE_BLOCK=1,
    stride_ckv=0, stride_cb=0, stride_co=0, stride_ch=0, stride_cd=0,
    WRITE_KV: tl.constexpr = False,
    n_tokens=0, q_heads=1, Q_GROUPS: tl.constexpr = 1,
    dp_ptr=None, stride_dpt=0, stride_dps=0, stride_dpj=0, d_splits=1, db_ptr=None,
    stride_dbs=0, stride_dbl=0, stride_dbn=0, stride_dbr=0, dmap_ptr=None, d_rank=0, d_loras=0,
    DELTA: tl.constexpr = False, D_BLOCK_J: tl.constexpr = 1, D_BLOCK_R: tl.constexpr = 4,
):
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)  # q head group (< Q_GROUPS), the keys (Q_GROUPS) or the values (Q_GROUPS + 1)
    c1 = tl.arange(0, HALF_P)
    c_ok = c1 < HALF
    # this program's heads: a group of query heads, or every key / value head
    if part < Q_GROUPS:
        col0 = part * q_heads * HEAD_DIM
        n_heads = tl.minimum(q_heads, NQ - part * q_heads)
    else:
        col0 = part * 0
        n_heads = NK + part * 0
    d_s = tl.maximum(tl.minimum(part - Q_GROUPS + 1, 2), 0)  # its LoRA slice: q, k or v
    heads = tl.arange(0, NH_P)
    h_ok = heads < n_heads
    ok1 = h_ok[:, None] & c_ok[None, :]
    off1 = heads[:, None] * HEAD_DIM + c1[None, :]
    if HAS_PASS:
        cp = tl.arange(0, PASS_P)
        okp = h_ok[:, None] & (cp < HEAD_DIM - 2 * HALF)[None, :]
        offp = heads[:, None] * HEAD_DIM + 2 * HALF + cp[None, :]
    if DELTA:  # the token's slot and its B rows of these heads (step-invariant) before the wait
        d_slot, d_on = pending_slot(dmap_ptr, t, d_loras, t < n_tokens)
        b1 = pending_b(db_ptr, stride_dbs, stride_dbl, stride_dbn, stride_dbr, d_rank, d_slot, d_on, d_s, col0 + off1,
                       ok1, D_BLOCK_R)
        b2 = pending_b(db_ptr, stride_dbs, stride_dbl, stride_dbn, stride_dbr, d_rank, d_slot, d_on, d_s,
                       col0 + off1 + HALF, ok1, D_BLOCK_R)
        if HAS_PASS:
            bp = pending_b(db_ptr, stride_dbs, stride_dbl, stride_dbn, stride_dbr, d_rank, d_slot, d_on, d_s,
                           col0 + offp, okp, D_BLOCK_R)
    pdl_wait(USE_PDL)
    cache_row = v_ptr
    to_cache = t < 0
    if WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cache_row = cache_ptr + (slot // CACHE_BLOCK) * stride_cb + (slot % CACHE_BLOCK) * stride_co
        to_cache = slot >= 0
    if DELTA:
        if part == Q_GROUPS + 1:  # the values + their delta, in place (and clipped into the cache)
            v_row = v_ptr + t * stride_v
            c_off1 = heads[:, None] * stride_ch + c1[None, :] * stride_cd
            _lora_value_tile(v_row, off1, ok1, b1, cache_row, c_off1, to_cache, clip, dp_ptr, stride_dpt, stride_dps,
                             stride_dpj, d_splits, d_rank, d_on, t, stride_ckv, CLIP, WRITE_KV, D_BLOCK_J, D_BLOCK_R)
            _lora_value_tile(v_row, off1 + HALF, ok1, b2, cache_row, c_off1 + HALF * stride_cd, to_cache, clip, dp_ptr,
                             stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, stride_ckv, CLIP, WRITE_KV,
                             D_BLOCK_J, D_BLOCK_R)
            if HAS_PASS:
                _lora_value_tile(v_row, offp, okp, bp, cache_row,
                                 heads[:, None] * stride_ch + (2 * HALF + cp)[None, :] * stride_cd, to_cache, clip,
                                 dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, stride_ckv,
                                 CLIP, WRITE_KV, D_BLOCK_J, D_BLOCK_R)
            return
    if WRITE_KV:
        if part == Q_GROUPS + 1:  # the values: clipped, then stored as they are
            _store_values(v_ptr + t * stride_v, cache_row + stride_ckv, to_cache, NK, HEAD_DIM, HALF, clip,
                          stride_ch, stride_cd, CLIP, HAS_PASS, NH_P, HALF_P, PASS_P)
            return
    if part < Q_GROUPS:  # this group's query heads
        src = q_ptr + t * stride_q + col0
        dst = q_out_ptr + t * stride_qo + col0
        w_ptr = qw_ptr
        norm_heads = NQ
    else:
        src = k_ptr + t * stride_k
        dst = k_out_ptr + t * stride_ko
        w_ptr = kw_ptr
        norm_heads = NK
    x1 = tl.load(src + off1, mask=ok1, other=0.0)
    x2 = tl.load(src + off1 + HALF, mask=ok1, other=0.0)
    dt = x1.dtype
    y1 = x1.to(tl.float32)
    y2 = x2.to(tl.float32)
    if DELTA:  # the projection's pending delta, rounded once into its output
        y1 = (y1 + pending_apply(dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, d_s, b1,
                                 D_BLOCK_J, D_BLOCK_R)).to(dt).to(tl.float32)
        y2 = (y2 + pending_apply(dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, d_s, b2,
                                 D_BLOCK_J, D_BLOCK_R)).to(dt).to(tl.float32)
    if HAS_PASS:
        yp = tl.load(src + offp, mask=okp, other=0.0).to(tl.float32)
        if DELTA:
            yp = (yp + pending_apply(dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, d_s, bp,
                                     D_BLOCK_J, D_BLOCK_R)).to(dt).to(tl.float32)

    if NORM != 0:
        ss = tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)
        if HAS_PASS:
            ss += tl.sum(yp * yp, axis=1)
        if NORM == 1:
            rstd = tl.rsqrt(ss / HEAD_DIM + eps)[:, None]
            woff1 = c1[None, :]
        else:  # one q group (Q_GROUPS == 1): every head of the row
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / (norm_heads * HEAD_DIM) + eps)
            woff1 = off1
        w1 = tl.load(w_ptr + woff1, mask=ok1, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + woff1 + HALF, mask=ok1, other=0.0).to(tl.float32)
        y1 = (w1 * (y1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        y2 = (w2 * (y2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        if HAS_PASS:
            if NORM == 1:
                woffp = 2 * HALF + cp[None, :]
            else:
                woffp = offp
            wp = tl.load(w_ptr + woffp, mask=okp, other=0.0).to(tl.float32)
            yp = (wp * (yp * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    if CLIP:
        y1 = tl.minimum(tl.maximum(y1, -clip), clip).to(dt).to(tl.float32)
        y2 = tl.minimum(tl.maximum(y2, -clip), clip).to(dt).to(tl.float32)
        if HAS_PASS:
            yp = tl.minimum(tl.maximum(yp, -clip), clip).to(dt).to(tl.float32)

    cos_f, sin_f = _rope_rows(pos_ptr, cos_ptr, sin_ptr, t, MAX_POS, stride_cos, c1, c_ok)
    cos = cos_f.to(dt).to(tl.float32)[None, :]
    sin = sin_f.to(dt).to(tl.float32)[None, :]
    o1 = (y1 * cos).to(dt).to(tl.float32) - (y2 * sin).to(dt).to(tl.float32)
    o2 = (y2 * cos).to(dt).to(tl.float32) + (y1 * sin).to(dt).to(tl.float32)
    out_t = q_out_ptr.dtype.element_ty
    tl.store(dst + off1, o1.to(out_t), mask=ok1)
    tl.store(dst + off1 + HALF, o2.to(out_t), mask=ok1)
    if HAS_PASS:
        tl.store(dst + offp, yp.to(out_t), mask=okp)
    if WRITE_KV:
        if part == Q_GROUPS:  # the rotated keys, rounded as stored above, into the cache
            cache_t = cache_ptr.dtype.element_ty
            ok = to_cache
            c_off1 = heads[:, None] * stride_ch + c1[None, :] * stride_cd
            tl.store(cache_row + c_off1, o1.to(out_t).to(cache_t), mask=ok1 & ok)
            tl.store(cache_row + c_off1 + HALF * stride_cd, o2.to(out_t).to(cache_t), mask=ok1 & ok)
            if HAS_PASS:
                c_offp = heads[:, None] * stride_ch + (2 * HALF + cp[None, :]) * stride_cd
                tl.store(cache_row + c_offp, yp.to(out_t).to(cache_t), mask=okp & ok)


@triton.jit
def _store_values(src, dst, ok, NK, HEAD_DIM, HALF, clip, stride_ch, stride_cd, CLIP: tl.constexpr,
                  HAS_PASS: tl.constexpr, NH_P: tl.constexpr, HALF_P: tl.constexpr, PASS_P: tl.constexpr):
    """Token t's values [NK heads, HEAD_DIM] from ``src`` (contiguous heads) into its cache row ``dst``, in
    the key tiles' column split (two halves of the rotary width, then the pass-through columns)."""
    heads = tl.arange(0, NH_P)
    h_ok = heads < NK
    c1 = tl.arange(0, HALF_P)
    ok1 = h_ok[:, None] & (c1 < HALF)[None, :] & ok
    for part in tl.static_range(2):
        cols = part * HALF + c1
        v = tl.load(src + heads[:, None] * HEAD_DIM + cols[None, :], mask=ok1, other=0.0)
        if CLIP:
            v = tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip).to(v.dtype)
        tl.store(dst + heads[:, None] * stride_ch + cols[None, :] * stride_cd, v.to(dst.dtype.element_ty), mask=ok1)
    if HAS_PASS:
        cp = tl.arange(0, PASS_P)
        okp = h_ok[:, None] & (cp < HEAD_DIM - 2 * HALF)[None, :] & ok
        cols = 2 * HALF + cp
        v = tl.load(src + heads[:, None] * HEAD_DIM + cols[None, :], mask=okp, other=0.0)
        if CLIP:
            v = tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip).to(v.dtype)
        tl.store(dst + heads[:, None] * stride_ch + cols[None, :] * stride_cd, v.to(dst.dtype.element_ty), mask=okp)


@triton.jit
def _lora_value_tile(src, off, ok, b, cache_row, c_off, to_cache, clip, dp_ptr, stride_dpt, stride_dps, stride_dpj,
                     d_splits, d_rank, d_on, t, stride_ckv, CLIP: tl.constexpr, WRITE_KV: tl.constexpr,
                     D_BLOCK_J: tl.constexpr, D_BLOCK_R: tl.constexpr):
    """One tile of token t's values at ``src + off`` + the v slice's pending delta (B's tile ``b``), rounded once
    and stored back in place; with WRITE_KV also into its cache row (clipped) where ``to_cache``."""
    v = tl.load(src + off, mask=ok, other=0.0)
    d = pending_apply(dp_ptr, stride_dpt, stride_dps, stride_dpj, d_splits, d_rank, d_on, t, 2, b, D_BLOCK_J,
                      D_BLOCK_R)
    v = (v.to(tl.float32) + d).to(v.dtype)
    tl.store(src + off, v, mask=ok)
    if WRITE_KV:
        if CLIP:
            v = tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip).to(v.dtype)
        tl.store(cache_row + stride_ckv + c_off, v.to(cache_row.dtype.element_ty), mask=ok & to_cache)
