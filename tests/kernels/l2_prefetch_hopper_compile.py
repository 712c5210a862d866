"""Compile the launches that warm L2 (``ops/l2_prefetch.py``) for an H100/H200 (sm_90) without a GPU: run as a
script without TRITON_INTERPRET, by test_l2_prefetch.py.  With PREFETCH each must issue its bulk L2 prefetches
after the PDL wait (so that they do not compete with the weight stream before it; before it with the norm's
PF_EARLY) and store nothing on that path;
without it the kernel has no prefetch and the same registers.  One "ok" line per kernel; exits 1 on failure."""
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from benchmarks.kernels.sass_stats import resources, specialise  # noqa: E402
from vllm.model_executor.layers.fused_moe.ops._activation_kernel import _moe_activation_kernel  # noqa: E402
from vllm.model_executor.layers.fused_moe.router._topk_softmax_kernel import _topk_softmax_kernel  # noqa: E402
from vllm.model_executor.layers.ops._qk_norm_rope_kernel import _qk_norm_rope_kernel  # noqa: E402
from vllm.model_executor.layers.ops._rms_norm_kernel import _rms_norm_kernel  # noqa: E402

PF = {"PF_CHUNK": 512 * 1024, "PF_PIECE": 64 * 1024}
CASES = {
    "rms_norm": (_rms_norm_kernel, {**{n: "bf16" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")},
                                    "pf_ptr": "u8"},
                 {"HAS_RESIDUAL": True, "BLOCK_N": 2048},
                 {**{n: 2048 for n in ("N", "stride_x", "stride_r", "stride_o", "stride_ro")}, "n_rows": 0,
                  "pf_bytes": 0}, 8),
    # the input norm's prefetch before the wait (PF_EARLY)
    "rms_norm_early": (_rms_norm_kernel, {**{n: "bf16" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr",
                                                                 "res_out_ptr")}, "pf_ptr": "u8"},
                       {"HAS_RESIDUAL": True, "BLOCK_N": 2048},
                       {**{n: 2048 for n in ("N", "stride_x", "stride_r", "stride_o", "stride_ro")}, "n_rows": 0,
                        "pf_bytes": 0}, 8),
    "qk_norm_rope": (_qk_norm_rope_kernel,
                     {**{n: "bf16" for n in ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "qw_ptr", "kw_ptr")},
                      "pos_ptr": "i64", "cos_ptr": "fp32", "sin_ptr": "fp32", "pf_ptr": "u8"},
                     {"NORM": 1, "CLIP": False, "HAS_PASS": False, "NH_P": 32, "HALF_P": 64, "PASS_P": 1},
                     {"NQ": 0, "NK": 0, "HEAD_DIM": 128, "HALF": 64, "MAX_POS": 0, "stride_q": 5120,
                      "stride_k": 5120, "stride_qo": 4096, "stride_ko": 512, "stride_cos": 64, "n_tokens": 0,
                      "pf_bytes": 0}, 8),
    "topk_softmax": (_topk_softmax_kernel, {"logits_ptr": "bf16", "bias_ptr": "bf16", "weights_ptr": "fp32",
                                            "ids_ptr": "i32", "pf_ptr": "u8"},
                     {"TOP_K": 8, "K_P": 8, "BLOCK_E": 128, "HAS_BIAS": False, "RENORMALIZE": True,
                      "TOPK_THEN_SOFTMAX": False, "PF_CHUNKS": 8},
                     {"E": 0, "stride_l": 128, "stride_w": 8, "stride_i": 8, "pf_expert_bytes": 6291456,
                      "pf_bytes": 0}, 1),
    "moe_activation": (_moe_activation_kernel, {"x_ptr": "bf16", "out_ptr": "bf16", "d_ptr": "fp32", "ids_ptr": "i32",
                                                "pf_ptr": "u8"},
                       {"ACT": 0, "BLOCK_N": 1024, "HAS_DELTA": False, "PF_CHUNKS": 4},
                       {"W_out": 768, "stride_xm": 1536, "stride_xn": 1, "stride_om": 768, "stride_on": 1,
                        "stride_dm": 1536, "stride_dn": 1, "n_pairs": 0, "pf_expert_bytes": 3145728, "pf_bytes": 0},
                       8),
}


def _branch_point(ptx: str, at: int) -> int:
    """Where control leaves the straight line for the code at ``at``: the branch to the label of the block holding
    it (the compiler may place that block anywhere in the text), or ``at`` itself when it is reached in line."""
    label = re.findall(r"^(\$L__BB\w+):", ptx[:at], flags=re.M)
    if not label:
        return at
    branch = ptx.find(f"bra.uni \t{label[-1]};")
    branch = branch if branch >= 0 else ptx.find(f"{label[-1]};")
    return branch if 0 <= branch < ptx.rfind(f"{label[-1]}:") else at


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for name, (fn, ptrs, cexp, ints, warps) in CASES.items():
        regs = {}
        early = name.endswith("_early")
        for prefetch in (False, True):
            extra = {**PF, "PREFETCH": True, **({"PF_EARLY": True} if early else {})} if prefetch else {}
            src = specialise(fn, ptrs, {**cexp, "USE_PDL": True, **extra}, ints)
            out = triton.compile(src, target=target, options={"num_warps": warps, "launch_pdl": True})
            ptx = out.asm["ptx"]
            regs[prefetch], spills = resources(out.asm["cubin"])
            count = ptx.count("cp.async.bulk.prefetch.L2.global")
            if not prefetch:
                if count:
                    sys.exit(f"{name}: a prefetch without PREFETCH")
                continue
            wait, first = ptx.find("griddepcontrol.wait"), ptx.find("cp.async.bulk.prefetch.L2.global")
            reached = _branch_point(ptx, first)  # where the path to the first prefetch leaves the main line
            if count != PF["PF_CHUNK"] // PF["PF_PIECE"] or not 0 <= min(wait, first) or (reached < wait) != early:
                sys.exit(f"{name}: {count} prefetches (want {PF['PF_CHUNK'] // PF['PF_PIECE']}), the first at "
                         f"{first}, the wait at {wait}")
            if spills:
                sys.exit(f"{name}: {spills} bytes of spills with PREFETCH")
        print(f"ok {name} registers {regs[False]} -> {regs[True]}", flush=True)


if __name__ == "__main__":
    main()
