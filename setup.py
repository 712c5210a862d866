"""Build script.

The CUDA ops in ``csrc/`` are compiled only where a ``csrc/`` folder with
sources, a CUDA toolkit and a CUDA build of torch are all present; everywhere
else (no GPU, no toolkit, or no CUDA sources yet) the package installs as pure
Python and every op uses its Triton or torch path.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_sources(root: str) -> list:
    """The ``.cu`` / ``.cpp`` files of ``root/csrc``, relative to ``root``; [] when there is no such folder."""
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        return []
    return sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))


def cuda_extensions(root: str = HERE):
    """(ext_modules, cmdclass) for ``setup()``: the ``vllm._C`` extension, or nothing."""
    if os.environ.get("VLLM_SKIP_CSRC", "0") == "1":
        return [], {}
    sources = cuda_sources(root)
    if not sources:  # checked first: without sources nothing needs torch's build tools
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch missing at build time: pure-Python install
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension(
        name="vllm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
