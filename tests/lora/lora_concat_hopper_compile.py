"""Compile the dense LoRA's concatenated shrink (``_lora_concat_kernel.py``) for an H100/H200 (sm_90) without a
GPU: run as a script, without TRITON_INTERPRET, by test_dense_lora_concat.py.  The Qwen3-30B-A3B q/k/v (3 slices,
K 2048) and o (K 4096) launches at 4 slots of rank 16, one or all four slots a program, specialised as at run
time on contiguous tensors, with PDL (no global load or store before ``griddepcontrol.wait``).  Prints one line
per case (registers, spills, shared memory, plain loads in the K loop); exits 1 when one spills, fails that, or
loads x or A into registers inside its K loop (it would wait one round trip per K tile)."""
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import triton  # noqa: E402

from benchmarks.kernels.sass_stats import TARGET, _sass, _sass_loops, pdl_compile_check, specialise  # noqa: E402
from vllm.lora.ops.triton_ops import lora_concat  # noqa: E402
from vllm.lora.ops.triton_ops._lora_concat_kernel import lora_concat_shrink_kernel  # noqa: E402


def compile_case(K: int, S: int, G: int, L: int = 4, R: int = 16, T: int = 256):
    width = K + S * L * R
    src = specialise(lora_concat_shrink_kernel, dict(x_ptr="bf16", a_ptr="bf16", mapping_ptr="i32", out_ptr="bf16"),
                     dict(G=G, BLOCK_M=lora_concat.BLOCK_M, BLOCK_N=max(16, G * R),
                          BLOCK_K=lora_concat.block_k_for(K), UPCAST=False, USE_PDL=True),
                     dict(T=T, K=K, L=L, R=R, stride_xt=K, stride_xk=1, stride_as=L * R * K, stride_al=R * K,
                          stride_ar=K, stride_ak=1, stride_ot=width, stride_ok=1, NUM_SL=S * L // G))
    return triton.compile(src, target=TARGET, options=dict(num_warps=4, num_stages=3, launch_pdl=True))


def main() -> int:
    bad = 0
    for name, (K, S, G) in {"qkv": (2048, 3, 1), "o": (4096, 1, 1), "qkv, 4 slots a program": (2048, 3, 4),
                            "o, 4 slots a program": (4096, 1, 4)}.items():
        k = compile_case(K, S, G)
        ok, regs, spills = pdl_compile_check(k)
        # the K loop (the one with the MMAs): x and A both through cp.async (LDGSTS), no load into registers
        sass = _sass(k.asm["cubin"])
        loops = [lp for lp in _sass_loops(sass) if any("HMMA" in i for i in lp)] if sass else []
        plain = sum(1 for lp in loops for i in lp if "LDG." in i)  # not LDGSTS / LDGDEPBAR
        ok = ok and (sass is None or (len(loops) == 1 and plain == 0))
        bad += not ok
        print(f"{'ok' if ok else 'FAILED'} {name} (BLOCK_K {lora_concat.block_k_for(K)}): {regs} registers, "
              f"{spills} B local, shared {k.metadata.shared} B, K loop: {plain} loads into registers"
              f"{'' if sass else ' (no nvdisasm: not checked)'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
