"""Private ``@triton.jit`` bodies of split-context decode attention (flash-decoding; launcher:
``triton_backend.paged_decode_split``).

At decode (one query row per sequence) the single-pass kernel runs one program per (sequence, kv
head): at batch 1 with 4 kv heads, 4 programs on a GPU of 132 SMs.  Here the context is cut into
``NUM_SPLITS`` ranges of whole BLOCK_N tiles, one program per (sequence, kv head, range):

``decode_split_kernel`` - grid (sequences, kv heads, NUM_SPLITS).  The range of split s covers tiles
[s * per, (s + 1) * per) with per = max(cdiv(tiles, NUM_SPLITS), 1) and tiles = cdiv(seq_len,
BLOCK_N), from the seq_len read on the device (so the grid depends on the padded batch only and a
sequence's result does not depend on the rest of the batch).  A program whose range is empty exits;
the others write their unnormalised fp32 accumulator, running max (base 2, scale folded in) and
running sum for each query head of the group.

``decode_reduce_kernel`` - grid (sequences, query heads).  Rescales the valid splits' partials to
their common max and writes acc / sum in the output dtype.

Sliding window (``USE_WINDOW``): the ranges cover the tiles from the one holding position
seq_len - WINDOW (the first the query sees) to the end, so tiles before the window get no program
work at all; both kernels compute the same ranges (``_context_tiles``).  Sinks (``USE_SINKS``) join
the denominator once per head, in the reduce: max over the splits' maxima and the sink, and
exp2(sink - max) added to the sum.

``UPCAST`` (interpreter) converts dot operands to fp32, as in ``_paged_attention_kernel``.  Each tile's
block-table entries for the next tile are loaded beside its K / V.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _context_tiles(seq_len, WINDOW, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """(first position of the first tile, number of tiles, tiles per split) of one sequence."""
    first = 0
    if USE_WINDOW:
        first = (tl.maximum(seq_len - WINDOW, 0) // BLOCK_N) * BLOCK_N
    tiles = tl.cdiv(seq_len - first, BLOCK_N)
    per = tl.maximum(tl.cdiv(tiles, NUM_SPLITS), 1)
    return first, tiles, per


@triton.jit
def _split_range(seq_lens_ptr, seq, split, WINDOW, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 USE_WINDOW: tl.constexpr):
    """(sequence length, first position, end) of split ``split``'s range of sequence ``seq``."""
    seq_len = tl.load(seq_lens_ptr + seq)
    first, tiles, per = _context_tiles(seq_len, WINDOW, BLOCK_N, NUM_SPLITS, USE_WINDOW)
    lo = first + split * per * BLOCK_N
    return seq_len, lo, tl.minimum(lo + per * BLOCK_N, seq_len)


@triton.jit
def decode_split_kernel(
    q_ptr, kv_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,  # [B, H, NUM_SPLITS, BLOCK_D], [B, H, NUM_SPLITS] x 2, fp32
    qk_scale, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_HEADS, WINDOW,
    stride_qt, stride_qh, stride_qd,
    stride_kv, stride_kb, stride_ko, stride_kh, stride_kd,
    stride_bt_b,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    pdl_wait(USE_PDL)
    seq_len, lo, hi = _split_range(seq_lens_ptr, seq, split, WINDOW, BLOCK_N, NUM_SPLITS, USE_WINDOW)
    if lo >= seq_len:
        return

    g = tl.arange(0, BLOCK_M)  # query head within the group (rows past GROUP are padding)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = offs_d < HEAD_DIM
    head = kvh * GROUP + g
    tok = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    blk = tl.load(bt_row + (lo + offs_n) // BLOCK_SIZE, mask=lo + offs_n < hi, other=0).to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kh
    v_base = k_base + stride_kv
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + offs_n
        n_ok = k_pos < hi
        slot_off = blk * stride_kb + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_ko
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot_off[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        nxt = k_pos + BLOCK_N  # the next tile's block-table entries, issued beside this tile's K / V
        blk = tl.load(bt_row + nxt // BLOCK_SIZE, mask=nxt < hi, other=0).to(tl.int64)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        seen = n_ok
        if USE_WINDOW:
            seen = seen & (k_pos >= seq_len - WINDOW)
        s = tl.where(seen[None, :], s * qk_scale, float("-inf"))
        # every tile of a non-empty range has a position the query sees (the first tile holds
        # seq_len - WINDOW itself), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if v.dtype == tl.float32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M] index into [B, H, S]
    tl.store(part_m_ptr + row, m_i, mask=g_ok)
    tl.store(part_l_ptr + row, l_i, mask=g_ok)
    tl.store(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def decode_reduce_kernel(
    out_ptr, query_start_loc_ptr, seq_lens_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, sinks_ptr,
    HEAD_DIM, NUM_HEADS, WINDOW,
    stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, SPLITS_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, BLOCK_D)
    pdl_wait(USE_PDL)
    seq_len = tl.load(seq_lens_ptr + seq)
    first, tiles, per = _context_tiles(seq_len, WINDOW, BLOCK_N, NUM_SPLITS, USE_WINDOW)
    n_valid = tl.cdiv(tiles, per)
    s_ok = offs_s < n_valid
    row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + row, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=s_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head) * 1.4426950408889634  # log2 units, like the partial maxima
        m_all = tl.maximum(m_all, sink)
    w = tl.where(s_ok, tl.exp2(m - m_all), 0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    denom = tl.sum(l * w, axis=0)
    if USE_SINKS:
        denom += tl.exp2(sink - m_all)  # the sink, once per head
    out = tl.sum(acc * w[:, None], axis=0) / denom
    tok = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
