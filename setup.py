"""Build script.

The CUDA ops in ``csrc/`` are compiled only where a CUDA toolkit and a CUDA
build of torch are both present; everywhere else the package installs as pure
Python and every op falls back to its Triton or torch path.
"""
import os

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("VLLM_SKIP_CSRC", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch missing at build time: pure-Python install
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f)
        for f in os.listdir(os.path.join(here, "csrc"))
        if f.endswith((".cu", ".cpp"))
    )
    if not sources:
        return [], {}
    ext = CUDAExtension(
        name="vllm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
