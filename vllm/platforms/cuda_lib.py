"""The CUDA C++ kernels of ``csrc/capi/`` as one shared library with a C ABI, built on first use.

The sources take raw pointers and a stream (no torch headers), so ``nvcc`` builds them in seconds
and the library does not depend on torch's C++ ABI: ``library()`` compiles them once per machine
into a cache folder keyed by the sources' hash (``VLLM_CSRC_CACHE``, default
``~/.cache/vllm-moe-lora/csrc``) and opens the result with ``ctypes``.  It returns None - and says
why once, in the log - where that cannot work: no CUDA device, no ``nvcc`` (``CUDA_HOME`` or
``PATH``), no ``csrc/`` next to the package (an install without the sources), a failed build, or
``VLLM_CSRC=0``.  Callers then keep their Triton path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from typing import Optional

from vllm import envs
from vllm.logger import init_logger

logger = init_logger(__name__)

SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc",
                          "capi")
# sm_90a: Hopper (H100 / H200); sm_80: Ampere and anything newer through the driver's PTX JIT
GENCODE = ("-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_80,code=compute_80")


def _sources() -> list[str]:
    if not os.path.isdir(SOURCE_DIR):
        return []
    return sorted(os.path.join(SOURCE_DIR, f) for f in os.listdir(SOURCE_DIR) if f.endswith(".cu"))


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def extra_flags() -> list[str]:
    """``VLLM_CSRC_FLAGS``: more nvcc flags (e.g. ``-DINT4_MMA_STAGES=3``: a kernel variant to time); part of the
    cache key, so each set of flags has its own library."""
    return (envs.VLLM_CSRC_FLAGS or "").split()


def build_command(nvcc: str, sources: list[str], out: str) -> list[str]:
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *GENCODE, *extra_flags(), "-o", out,
            *sources, "-lcudart_static"]


def _cache_dir() -> str:
    return envs.VLLM_CSRC_CACHE or os.path.join(os.path.expanduser("~"), ".cache", "vllm-moe-lora", "csrc")


def _headers() -> list[str]:
    return sorted(os.path.join(SOURCE_DIR, f) for f in os.listdir(SOURCE_DIR) if f.endswith(".cuh"))


def build(nvcc: str, sources: list[str]) -> str:
    """Path of the built library (built now if this hash of the sources and headers has none yet).  Raises on a
    failed build."""
    digest = hashlib.sha256()
    for path in sources + _headers():
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    digest.update(" ".join([*GENCODE, *extra_flags()]).encode())
    folder = os.path.join(_cache_dir(), digest.hexdigest()[:16])
    lib = os.path.join(folder, "libvllm_capi.so")
    if os.path.isfile(lib):
        return lib
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    logger.info("building the CUDA C++ kernels of %s with %s (once per machine)", SOURCE_DIR, nvcc)
    done = subprocess.run(build_command(nvcc, sources, tmp), capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: a concurrent process sees the old state or the whole library
    return lib


@lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The built library, or None (the reason logged once); see the module docstring."""
    import torch

    if not envs.VLLM_CSRC:
        logger.info("CUDA C++ kernels off (VLLM_CSRC=0): the Triton kernels serve")
        return None
    if not torch.cuda.is_available():
        return None
    sources = _sources()
    nvcc = find_nvcc()
    if not sources or nvcc is None:
        logger.info("CUDA C++ kernels unavailable (%s): the Triton kernels serve",
                    "no csrc/capi sources next to the package" if not sources else "no nvcc: set CUDA_HOME")
        return None
    try:
        lib = ctypes.CDLL(build(nvcc, sources))
    except (OSError, RuntimeError) as exc:
        logger.warning("CUDA C++ kernels could not be built or loaded (%s): the Triton kernels serve", exc)
        return None
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """argtypes of the exported functions (ctypes would otherwise pass 64-bit values as C ints)."""
    ll, i, p = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    lib.vllm_capi_error_string.restype = ctypes.c_char_p
    lib.vllm_capi_error_string.argtypes = [i]
    lib.vllm_int4_mma_block_n.restype = i
    lib.vllm_int4_mma_block_n.argtypes = []
    lib.vllm_int4_mma_moe_gemm.restype = i
    lib.vllm_int4_mma_moe_gemm.argtypes = [
        i, p, ll,  # dtype, a, stride_am
        p, ll,  # words, stride_qe
        p, ll, ll,  # scales, stride_se, stride_sg
        p, ll, ll,  # zeros, stride_ze, stride_zg
        p, ll, ll, i,  # out, stride_os, stride_om, out_fp32
        p, p, p, p,  # topk_weights, sorted_ids, block_expert, num_post_padded
        i, i, i, i,  # num_blocks, bm, num_pairs, top_k_in
        i, i, i, i, i, i,  # N, K, group, bk, split, pdl
        p,  # stream
    ]
    lib.vllm_mxfp4_mma_moe_gemm.restype = i
    lib.vllm_mxfp4_mma_moe_gemm.argtypes = [
        p, ll,  # a, stride_am
        p, ll,  # words, stride_qe
        p, ll, ll,  # scales, stride_se, stride_sg
        p, ll,  # bias, stride_be
        p, ll, ll, i,  # out, stride_os, stride_om, out_fp32
        p, p, p, p,  # topk_weights, sorted_ids, block_expert, num_post_padded
        i, i, i, i,  # num_blocks, bm, num_pairs, top_k_in
        i, i, i, i, i, i,  # N, K, bk, split, fold, pdl
        p,  # stream
    ]


def check(lib: ctypes.CDLL, err: int, what: str) -> None:
    """Raise with CUDA's own words for a launch's error code (0: nothing to say)."""
    if err != 0:
        raise RuntimeError(f"{what}: CUDA error {err} ({lib.vllm_capi_error_string(err).decode()})")
