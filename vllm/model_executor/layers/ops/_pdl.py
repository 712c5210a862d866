"""Triton helpers of programmatic dependent launch (host side: ``vllm/platforms/pdl.py``).

A kernel launched with ``launch_pdl`` may be running before the previous kernel on its stream has
finished.  ``pdl_wait`` (when ``USE_PDL``) blocks until that kernel has completed and its writes are
visible - every load of data another kernel produced, and every store, must come after it - then lets
the next kernel launch (``griddepcontrol.launch_dependents``), so at most one kernel waits ahead.
Loads of data no kernel writes during a step (weights) may come before it.
"""
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: USE_PDL is never set (platforms/pdl.py)
    gdc_wait = gdc_launch_dependents = None


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
