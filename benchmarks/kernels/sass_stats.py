"""Reading a Triton kernel compiled for sm_90 without a GPU: its resources and its main loop's instructions.

Used by ``kernel_static_report.py``: ``specialise`` builds the kernel's source as the JIT would for given
argument values, ``resources`` reads registers and spills (``cuobjdump``), ``main_loop_stats`` finds the
main K loop in the SASS (``nvdisasm`` from Triton's bundled CUDA tools; the PTX if it is missing) and counts
its instructions per weight, integer->float conversions, shared stores and whether it is pipelined.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
_MMA = ("HMMA", "HGMMA")
_CONVERT = ("I2F", "F2F", "I2FP", "F2FP")


@dataclass
class LoopStats:
    source: str  # "sass" or "ptx"
    instructions: int
    per_weight: float
    converts_per_weight: float
    shared_stores_per_weight: float
    pipelined: bool


def _bin_dir() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin")


def specialise(fn, pointers: dict[str, str], constexprs: dict[str, Any], ints: dict[str, int]) -> ASTSource:
    """An ASTSource as the JIT would build it for these argument values; constexprs not given take their
    defaults (e.g. ``USE_PDL``: a plain launch), other arguments not given their default's type."""
    cexp = dict(constexprs)
    for p in fn.params:
        if p.is_constexpr and p.name not in cexp and p.default is not inspect.Parameter.empty:
            cexp[p.name] = p.default
    floats = {p.name for p in fn.params if isinstance(p.default, float) and not p.is_constexpr}
    cexp.update({n: 1 for n, v in ints.items() if v == 1})
    sig = {n: ("*" + pointers[n]) if n in pointers else "constexpr" if n in cexp else "fp32" if n in floats
           else "i32" for n in fn.arg_names}
    div16 = set(pointers) | {n for n, v in ints.items() if v != 1 and v % 16 == 0}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    return ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()}, attrs=attrs)


def _sass(cubin: bytes) -> Optional[str]:
    tool = os.path.join(_bin_dir(), "nvdisasm")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool, "-c", f.name], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def resources(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """(registers, local-memory bytes: spills) from ``cuobjdump -res-usage``."""
    tool = os.path.join(_bin_dir(), "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", out), re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def pdl_compile_check(kernel) -> tuple[bool, Optional[int], Optional[int]]:
    """(ok, registers, spilled bytes) of a kernel compiled with PDL: ok when nothing spills and the PTX has
    ``griddepcontrol.wait`` with no global load or store before it."""
    regs, spills = resources(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    before = ptx[:wait]
    return spills == 0 and wait >= 0 and "st.global" not in before and "ld.global" not in before, regs, spills


def _sass_loops(sass: str) -> list[list[str]]:
    """Opcodes of each loop body (a label up to a later branch back to it), outermost spans included."""
    ops: list[tuple[Optional[str], str]] = []  # (label defined here, opcode) in order
    pending = None
    for line in sass.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)$", line)
        if m:
            ops.append((pending, m.group(1) + m.group(2)))
            pending = None
    where = {lab: i for i, (lab, _) in enumerate(ops) if lab}
    loops = []
    for i, (_, text) in enumerate(ops):
        m = re.match(r"BRA\S*\s+`?\(?(\.L_x_\d+)", text)
        if m and m.group(1) in where and where[m.group(1)] <= i:
            loops.append([t.split()[0] for _, t in ops[where[m.group(1)]: i + 1]])
    return loops


def _ptx_loops(ptx: str) -> list[list[str]]:
    lines = [ln.strip() for ln in ptx.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\$L__BB\w+:$", ln)}
    loops = []
    for i, ln in enumerate(lines):
        m = re.match(r"^(?:@%p\d+\s+)?bra(?:\.uni)?\s+(\$L__BB\w+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = [x.split()[0] for x in lines[labels[m.group(1)]: i + 1]
                    if x and not x.startswith(("$", "//", ".", "{", "}"))]
            loops.append(body)
    return loops


def main_loop_stats(kernel, weights_per_iter: int, num_warps: int, *, mma: bool = True,
                    innermost: bool = False) -> LoopStats:
    """The K loop: the longest loop that holds a matrix-multiply instruction (``mma=False``: an FMA,
    for the GEMV kernels; ``innermost``: the shortest such loop, for a K loop nested in a row loop)."""
    sass = _sass(kernel.asm["cubin"])
    if sass is not None:
        source, loops = "sass", _sass_loops(sass)
        is_mma = lambda op: op.startswith(_MMA if mma else ("FFMA",))  # noqa: E731
        is_conv = lambda op: op.startswith(_CONVERT)  # noqa: E731
        is_sts = lambda op: op.startswith("STS")  # noqa: E731
        is_async = lambda op: op.startswith(("LDGSTS", "UTMALDG"))  # noqa: E731
    else:
        source, loops = "ptx", _ptx_loops(kernel.asm["ptx"])
        is_mma = lambda op: op.startswith(("mma", "wgmma") if mma else ("fma",))  # noqa: E731
        is_conv = lambda op: op.startswith("cvt") and ".f" in op  # noqa: E731
        is_sts = lambda op: op.startswith("st.shared")  # noqa: E731
        is_async = lambda op: op.startswith(("cp.async", "cp.async.bulk"))  # noqa: E731
    pick = min if innermost else max
    body = pick((lp for lp in loops if any(is_mma(op) for op in lp)), key=len, default=[])
    per_thread = weights_per_iter / (32 * num_warps)
    return LoopStats(source, len(body), len(body) / per_thread, sum(map(is_conv, body)) / per_thread,
                     sum(map(is_sts, body)) / per_thread, any(map(is_async, body)))
