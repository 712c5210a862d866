"""Private Triton body of the grammar mask (launcher: ``bitmask.py``, ``apply_token_bitmask_``).

Grid (R, vocabulary blocks).  Program (i, b) reads WORDS words of bitmask row i once, expands their
bits in registers as a [WORDS, 32] tile (bit j of word w is token 32 * w + j) and stores -inf into
logits row ``rows[i]`` where a bit is 0.  Allowed tokens are never read nor written, so they stay bit
for bit; words past the bitmask's width read as 0 (their tokens are not allowed).  A row index
outside [0, B) writes nothing (no out-of-bounds store; the caller guarantees valid rows).
"""
import triton
import triton.language as tl


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr, bitmask_ptr, rows_ptr,
    n_logit_rows, vocab, n_words,
    stride_lr, stride_lv, stride_br, stride_bw,
    HAS_ROWS: tl.constexpr, WORDS: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i
    word = blk * WORDS + tl.arange(0, WORDS)
    bits = tl.load(bitmask_ptr + i * stride_br + word.to(tl.int64) * stride_bw, mask=word < n_words, other=0)
    shift = tl.arange(0, 32)
    tok = word[:, None] * 32 + shift[None, :]
    blocked = ((bits[:, None] >> shift[None, :]) & 1) == 0
    write = blocked & (tok < vocab) & (row >= 0) & (row < n_logit_rows)
    # made in float32 and converted: Triton 3.6's interpreter has no bf16 constants
    neg_inf = tl.full([WORDS, 32], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_lr + tok.to(tl.int64) * stride_lv, neg_inf, mask=write)
