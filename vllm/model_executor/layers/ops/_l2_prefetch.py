"""Triton helper of the L2 weight prefetch (host side and the reason: ``l2_prefetch.py``).

``l2_prefetch_chunk`` asks the memory system to bring bytes [chunk * CHUNK, min((chunk + 1) * CHUNK, nbytes))
of ``base_ptr`` into L2, in pieces of PIECE bytes: one ``cp.async.bulk.prefetch.L2`` per piece (sm_90+: the
copy engine of the SM fetches it; nothing waits for it, nothing is written), issued by the program's first
thread.  ``base_ptr`` must be 16-byte aligned and ``nbytes`` a multiple of 16 (the instruction's rules; the
host side rounds down).  Under the interpreter (``INTERP``) the pieces are walked without the instruction, so
the CPU tests run the same control flow.
"""
import triton
import triton.language as tl


@triton.jit
def _bulk_prefetch_l2(addr, nbytes):
    # thread 0 of the program issues it: every thread runs an elementwise asm on scalars
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def l2_prefetch_chunk(base_ptr, nbytes, chunk, CHUNK: tl.constexpr, PIECE: tl.constexpr, INTERP: tl.constexpr):
    start = chunk.to(tl.int64) * CHUNK
    for off in tl.static_range(0, CHUNK, PIECE):
        left = nbytes - (start + off)
        if left > 0:
            n = tl.minimum(left, PIECE).to(tl.int32)
            if not INTERP:
                _bulk_prefetch_l2((base_ptr + start + off).to(tl.int64, bitcast=True), n)
