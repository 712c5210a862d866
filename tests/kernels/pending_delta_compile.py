"""Compile the dense LoRA handoff's kernels (``ops/pending_delta.py``) for an H100/H200 (sm_90) with PDL, without a
GPU: run as a script without TRITON_INTERPRET, by test_pending_delta.py.  The norms with the shrink or the delta,
q/k norm + rotary with the delta and the decode GEMV with the shrink: no spills, their slot and A / B loads before ``griddepcontrol.wait`` and no store
before it.  The specialisations (Qwen3-30B-A3B widths, rank 16): ``benchmarks/kernels/handoff_static_report.py``.
One "ok" line per kernel; exits 1 on failure."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

from benchmarks.kernels.handoff_static_report import (SHRINK, H, _delta, compile_gemv, compile_norm,  # noqa: E402
                                                      compile_qk)
from benchmarks.kernels.sass_stats import resources  # noqa: E402


# q/k norm + rotary with the delta in the other model families' settings: no norm with a pass-through part, the
# fused KV write, clip and one KV head (Mixtral-like; NK = 1 is specialised as a constant); the full-row norm in
# one q program (OLMoE)
QK_VARIANTS = {"no norm, pass-through, KV write, clip, 1 KV head": (
                   {"NORM": 0, "HAS_PASS": True, "PASS_P": 32, "HALF_P": 32, "WRITE_KV": True, "CLIP": True},
                   {"HALF": 32, "NK": 1, "CACHE_BLOCK": 16, "stride_ckv": 1 << 20, "stride_cb": 2048,
                    "stride_co": 128, "stride_ch": 128, "stride_cd": 1}),
               "full-row norm, one q program": ({"NORM": 2, "Q_GROUPS": 1, "NH_P": 32}, {"q_heads": 32})}


def main() -> None:
    cases = [("norm + SHRINK", compile_norm(SHRINK)), ("norm + DELTA", compile_norm(_delta(H, 8))),
             ("qk_norm_rope + DELTA", compile_qk(True)), ("dense GEMV + SHRINK", compile_gemv(True))]
    cases += [(f"qk_norm_rope + DELTA, {name}", compile_qk(True, *over)) for name, over in QK_VARIANTS.items()]
    for name, out in cases:
        ptx = out.asm["ptx"]
        before = ptx[:ptx.find("griddepcontrol.wait")]
        loads, stores = before.count("ld.global"), before.count("st.global")
        _, spills = resources(out.asm["cubin"])
        if "griddepcontrol.wait" not in ptx or stores or spills or loads == 0:
            sys.exit(f"{name}: {loads} loads and {stores} stores before the wait, {spills} B spills")
        print(f"ok {name}: {loads} global loads before the wait", flush=True)


if __name__ == "__main__":
    main()
