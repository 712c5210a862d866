"""The tensor-core 4-bit kernels (``csrc/capi/w4_mma_moe.cuh``: int4 and MXFP4 entries) compiled for sm_90a without a GPU: per template
instance, registers and spills (``ptxas -v``) and its main loop's instructions per weight (SASS, read with the
``cuobjdump`` Triton ships).  The main loop is the innermost backward branch holding the most HMMAs: one pipeline
stage, 16 output channels x BK inputs per warp, so instructions per weight = loop instructions * 32 / (16 * BK)
(per thread, as the issue rate counts them; ~4 is what the H200's issue rate allows at its copy rate).

    python benchmarks/kernels/int4_mma_static_report.py [--nvcc PATH] [--flags "-DINT4_MMA_STAGES=3"]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(_ROOT, "csrc", "capi", f) for f in ("int4_mma_moe.cu", "mxfp4_mma_moe.cu")]
_NAME = re.compile(r"w4_mma_moe_kernelI(\w+?)Li(\d+)ELi(\d+)ELi(\d+)ELb(\d)ELb(\d)ELb(\d)E")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def _instance(mangled: str) -> tuple:
    m = _NAME.search(mangled)
    dtype = "bf16" if "bfloat16" in m.group(1) else "fp16"
    fmt = ("mxfp4" if m.group(6) == "1" else "int4") + (" folded" if m.group(7) == "1" else "")
    return fmt, dtype, int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5) == "1"


def main_loop_instructions(body: str) -> tuple:
    """(instructions of the main loop with the most MMAs, those of the other main loops): a loop is a backward
    branch's range holding MMAs and no shorter such range (W4_SKIP_PAD builds one loop per live-tile count)."""
    lines = re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(.*?);", body)
    hmma = [int(a, 16) for a, ins in lines if "HMMA" in ins or "HGMMA" in ins]
    loops = []
    for a, ins in lines:
        m = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < int(a, 16):
            lo, hi = int(m.group(1), 16), int(a, 16)
            mmas = sum(1 for h in hmma if lo <= h <= hi)
            if mmas:
                loops.append((lo, hi, mmas))
    inner = [x for x in loops if not any(y != x and x[0] <= y[0] and y[1] <= x[1] for y in loops)]
    sizes = [(mmas, sum(1 for a, _ in lines if lo <= int(a, 16) <= hi)) for lo, hi, mmas in inner]
    main_mmas, main_n = max(sizes)
    return main_n, tuple(n for m, n in sorted(sizes, reverse=True)[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvcc", default=None)
    p.add_argument("--flags", default="")
    args = p.parse_args()
    sys.path.insert(0, _ROOT)
    from vllm.platforms.cuda_lib import find_nvcc

    nvcc = args.nvcc or find_nvcc()
    if nvcc is None:
        sys.exit("no nvcc: set CUDA_HOME or pass --nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        lib = os.path.join(tmp, "lib.so")
        done = subprocess.run([nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
                               "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", *args.flags.split(), "-o",
                               lib, *SOURCES, "-lcudart_static"], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        regs, name = {}, None
        for line in done.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
            if m:
                name = m.group(1)
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                regs[name] = (int(m.group(1)), regs.get(name, (0, ""))[1])
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and name:
                regs[name] = (regs.get(name, (0, ""))[0], m.group(1))
        sass = subprocess.run([_cuobjdump(), "--dump-sass", lib], capture_output=True, text=True).stdout
    rows = []
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        mangled = part.split("\n", 1)[0].strip()
        fmt, dtype, bm, bk, g16, zeros = _instance(mangled)
        n, others = main_loop_instructions(part)
        reg, spill = regs.get(mangled, (None, "?"))
        rows.append((fmt, dtype, bm, bk, g16, zeros, n, n * 32 / (16 * bk), reg, spill, others))
    rows.sort()
    print(f"sm_90a, csrc/capi/w4_mma_moe.cuh {args.flags}\n\n| format | dtype | rows per block | stage | group "
          "(16-input tiles; 0 = whole stages) | zero points | main-loop instructions | per weight | registers | "
          "spill stores (B) | loops over fewer token tiles (W4_SKIP_PAD) |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {'yes' if r[5] else 'no'} | {r[6]} | {r[7]:.2f} | {r[8]} "
              f"| {r[9]} | {' / '.join(map(str, r[10])) or '-'} |")


if __name__ == "__main__":
    main()
