"""Private ``@triton.jit`` bodies of the Triton paged-attention backend
(launcher: ``triton_backend.py``).

``paged_attention_kernel`` - grid (sequences, query blocks, kv heads).  One
program owns ``BLOCK_Q`` consecutive query rows of one sequence and all
``GROUP`` query heads that share one kv head; the two are flattened into
``BLOCK_M = BLOCK_Q * GROUP_P`` rows (row m = query row m // GROUP_P, head
m % GROUP_P), so the K/V tiles it gathers are loaded once for the whole group.
It walks the sequence's context in tiles of ``BLOCK_N`` positions up to the
causal limit of its last query row; each position is translated through the
block table into (block, offset), so any block size works.  Softmax is online
in fp32 (running max and running sum, base 2 with the scale folded into
log2(e)); the output is written in the query dtype.  Programs whose query
block starts past the sequence's query_len exit at once.

Sliding window (``USE_WINDOW``, width ``WINDOW``): row at position p sees p - WINDOW + 1 .. p; the
context loop starts at the tile holding the first position the block's earliest row can see, so
tiles wholly before the window are never loaded.  Sinks (``USE_SINKS``, [num_heads] fp32 logits):
the running max and sum start at the head's sink (max = sink, sum = 1), which is the sink joining
the denominator once, and keeps every row's max finite.

``write_kv_kernel`` - grid (tokens,): store one token's K and V rows at its
slot; slot -1 means "skip".

``UPCAST`` (under ``TRITON_INTERPRET=1``) converts dot operands to fp32: the
interpreter's dot on 16-bit floats is not trustworthy.  Float32 dots are
``ieee`` (a float32 model gets float32 products on the GPU, not tf32).
Offsets that multiply a block / token index by a stride are 64-bit.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    sinks_ptr,  # [num_heads] fp32 (read only when USE_SINKS)
    qk_scale,  # softmax scale * log2(e)
    GROUP, HEAD_DIM, BLOCK_SIZE, WINDOW,
    stride_qt, stride_qh, stride_qd,
    stride_kv, stride_kb, stride_ko, stride_kh, stride_kd,
    stride_ot, stride_oh, stride_od,
    stride_bt_b,
    BLOCK_Q: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    seq = tl.program_id(0)
    qblock = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if qblock * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # positions already cached before this step's queries

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    offs_m = tl.arange(0, BLOCK_M)
    q_row = qblock * BLOCK_Q + offs_m // GROUP_P  # query row within the sequence
    g = offs_m % GROUP_P
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (q_row < q_len) & (g < GROUP)
    d_ok = offs_d < HEAD_DIM
    head = kvh * GROUP + g
    tok = (q_start + q_row).to(tl.int64)

    q_ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx_len + q_row  # absolute position of each row

    # Causal limit of the last query row of this block (exclusive).
    last_row = tl.minimum(qblock * BLOCK_Q + BLOCK_Q, q_len)
    kv_end = ctx_len + last_row

    if USE_SINKS:
        # log2 units, like the scores: the sink is a key of logit sink and value 0
        m_i = tl.load(sinks_ptr + head, mask=g < GROUP, other=0.0) * 1.4426950408889634
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    kv_start = 0
    if USE_WINDOW:
        # first position the block's earliest row sees, rounded down to its tile
        kv_start = (tl.maximum(ctx_len + qblock * BLOCK_Q - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kh
    v_base = k_base + stride_kv
    for start in range(kv_start, kv_end, BLOCK_N):
        k_pos = start + offs_n
        n_ok = k_pos < kv_end
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot_off = blk * stride_kb + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_ko
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slot_off[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot_off[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        allowed = (k_pos[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if USE_WINDOW and not USE_SINKS:
            # a row whose window starts past this tile has seen nothing yet: keep exp2 away from -inf - -inf
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # (otherwise every row's max is finite: it sees position 0 in its first tile, or starts at its sink)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if v.dtype == tl.float32:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def write_kv_kernel(
    key_ptr, value_ptr, kv_ptr, slot_mapping_ptr,
    NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kv, stride_cb, stride_co, stride_ch, stride_cd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    dst = kv_ptr + blk * stride_cb + off * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd
    elt = kv_ptr.dtype.element_ty
    tl.store(dst, k.to(elt), mask=mask)
    tl.store(dst + stride_kv, v.to(elt), mask=mask)
