"""Private Triton body of the router (launcher: ``fused_topk.py``): softmax (or top-k-then-softmax)
over the experts, top-k, optional renormalisation, in one program per token.

Grid (tokens,).  The token's E logits are one BLOCK_E tile in float32 (router bias added).  The k
largest are taken one at a time with an arg-max (ties go to the lowest expert id) and masked out, so
ids come out in descending score order, as ``torch.topk`` returns them.
"""
import triton
import triton.language as tl

from vllm.model_executor.layers.ops._pdl import pdl_wait


@triton.jit
def _route(logits_ptr, bias_ptr, row, E, stride_l, TOP_K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr,
           HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, TOPK_THEN_SOFTMAX: tl.constexpr):
    """Token ``row``'s (weights [K_P], ids [K_P]): the first TOP_K entries are its experts, best first."""
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(logits_ptr + row * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(ok, x, float("-inf"))
    m = tl.max(x, axis=0)
    p = tl.exp(x - m)
    if not TOPK_THEN_SOFTMAX:
        p = p / tl.sum(p, axis=0)
    p = tl.where(ok, p, -1.0)  # scores are >= 0: padding is never chosen

    offs_k = tl.arange(0, K_P)
    top_w = tl.zeros((K_P,), dtype=tl.float32)
    top_i = tl.zeros((K_P,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        val, idx = tl.max(p, axis=0, return_indices=True, return_indices_tie_break_left=True)
        top_w = tl.where(offs_k == j, val, top_w)
        top_i = tl.where(offs_k == j, idx.to(tl.int32), top_i)
        p = tl.where(offs == idx, -1.0, p)
    if RENORMALIZE or TOPK_THEN_SOFTMAX:
        top_w = top_w / tl.maximum(tl.sum(top_w, axis=0), 1e-20)
    return top_w, top_i


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    E, stride_l, stride_w, stride_i,
    TOP_K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, TOPK_THEN_SOFTMAX: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    top_w, top_i = _route(logits_ptr, bias_ptr, row, E, stride_l, TOP_K, K_P, BLOCK_E, HAS_BIAS, RENORMALIZE,
                          TOPK_THEN_SOFTMAX)
    offs_k = tl.arange(0, K_P)
    k_ok = offs_k < TOP_K
    tl.store(weights_ptr + row * stride_w + offs_k, top_w, mask=k_ok)
    tl.store(ids_ptr + row * stride_i + offs_k, top_i, mask=k_ok)
