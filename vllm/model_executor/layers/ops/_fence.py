"""``fence_every_thread``: before a kernel's last-program count (``ops/counters.py``), every thread's stores made
visible at GPU scope.  A barrier then one thread's release-ordered atomic is the usual pattern, but a fence is
per thread on the hardware: the stores of the other warps of the program may still be in flight when the count
lands.  So every thread fences (``fence.acq_rel.gpu``), then the program's barrier, then the count."""
import triton
import triton.language as tl


@triton.jit
def fence_every_thread(FENCE: tl.constexpr):
    """A GPU-scope acquire-release fence in every thread of the program; nothing with FENCE False (the
    interpreter, which runs programs one after another)."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)
