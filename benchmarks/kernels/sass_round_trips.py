"""Dependent global-memory round trips of a compiled kernel, read from its SASS (no GPU needed).

The model: one warp issues its instructions in program order (a GPU warp does); an instruction issues
when the previous one has and its source registers (and guard predicate) are ready; a global load's
result is ready one round trip after it issues, every other result at once.  ``round_trips`` is the
issue time of the last global store, in round trips: the global loads chained before it, counting
those that wait only because an earlier instruction in program order waits (a load placed after a
shared-memory store of an earlier load's value and its barrier, or after a branch on a loaded value).
Back edges are not followed (one pass of each loop).  Shared-memory and arithmetic latencies count 0.
"""
from __future__ import annotations

import re
from typing import Optional

# base opcodes (before the first dot)
_LOADS = frozenset({"LDG", "LD", "ATOMG", "ATOM"})
_STORES = frozenset({"STG", "ST", "RED"})
_NO_WRITE = frozenset({"STG", "ST", "STS", "STL", "RED", "BRA", "EXIT", "BAR", "MEMBAR", "NOP", "WARPSYNC",
                       "DEPBAR", "BSYNC", "BSSY", "RET", "CALL", "FENCE", "ERRBAR", "CCTL"})
_PRED_ONLY = frozenset({"ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "UISETP", "UPLOP3"})


def _regs(text: str) -> list[str]:
    """Register names an operand list reads; ``R8.64`` (an address pair) reads R8 and R9."""
    out = []
    for m in re.finditer(r"\b(U?R)(\d+)(\.64)?\b|\b(U?P\d)\b", text):
        if m.group(4):
            out.append(m.group(4))
            continue
        out.append(f"{m.group(1)}{m.group(2)}")
        if m.group(3):
            out.append(f"{m.group(1)}{int(m.group(2)) + 1}")
    return [r for r in out if r not in ("RZ", "URZ", "PT", "UPT")]


def round_trips(sass: str, trace: Optional[list] = None) -> int:
    """Dependent global round trips before the last global store (the model above).  ``trace``: a list
    that gets (address, issue time, opcode) of every global load and store, barrier and exit."""
    ready: dict[str, int] = {}
    now = last_store = 0
    for line in sass.splitlines():
        m = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?);", line)
        if not m:
            continue
        guard, op, rest = m.group(2) or "", m.group(3), m.group(4)
        ops = [o.strip() for o in rest.split(",")] if rest else []
        base_op = op.split(".")[0]
        is_load, is_store = base_op in _LOADS, base_op in _STORES
        lead = 0  # leading predicate destinations (ISETP P0, PT, ...; LOP3.LUT P0, R2, ...)
        while lead < len(ops) and re.fullmatch(r"U?P\d|U?PT", ops[lead]):
            lead += 1
        if base_op in _NO_WRITE:
            lead = 0
        writes_reg = base_op not in _NO_WRITE and base_op not in _PRED_ONLY and lead < len(ops)
        n_dst = lead + (1 if writes_reg else 0)
        dst, srcs = ",".join(ops[:n_dst]), _regs(guard) + _regs(",".join(ops[n_dst:]))
        now = max([now] + [ready.get(r, 0) for r in srcs])
        if is_store:
            last_store = max(last_store, now)
        if trace is not None and (is_load or is_store or base_op in ("BAR", "EXIT")):
            trace.append((m.group(1), now, op))
        width = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
        for d in _regs(dst):
            reg = re.match(r"(U?R)(\d+)$", d)
            names = [f"{reg.group(1)}{int(reg.group(2)) + i}" for i in range(width)] if reg else [d]
            for n in names:
                ready[n] = now + 1 if is_load else now
    return last_store


def round_trips_after_wait(sass: str) -> Optional[int]:
    """``round_trips`` of the code from the grid-dependency wait (``ACQBULK``, PTX ``griddepcontrol.wait``) on:
    what a PDL launch leaves on the critical path once the kernel before it has finished.  Loads issued before
    the wait count as ready at it (the wait normally outlasts them).  None: the kernel has no wait."""
    lines = sass.splitlines()
    at = next((i for i, line in enumerate(lines) if re.search(r"\bACQBULK\b", line)), None)
    return None if at is None else round_trips("\n".join(lines[at:]))
