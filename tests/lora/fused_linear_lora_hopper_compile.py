"""Compile the fused projection + LoRA kernel for an H100/H200 (sm_90) without a GPU: run as a script,
without TRITON_INTERPRET, by test_fused_linear_lora.py.  The interpreter runs the numbers; this catches
what only the compiler sees (types, layouts, dot shapes) and checks that the main loop is pipelined
(cp.async) and fits in shared memory, for the heuristic's tiles (``--sweep``: and the benchmark's sweep).
Arguments are specialised as at run time on contiguous tensors (16-byte aligned pointers, unit inner
strides, other strides and K divisible by 16).  Prints one line per variant; exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.kernels.benchmark_fused_linear_lora import sweep_configs  # noqa: E402
from vllm.lora.ops.triton_ops._fused_linear_lora_kernel import fused_linear_lora_kernel  # noqa: E402
from vllm.lora.ops.triton_ops.fused_linear_lora import fused_linear_lora_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn")
DIV16 = ("K", "stride_xt", "stride_wn", "stride_as", "stride_al", "stride_ar", "stride_bs", "stride_bl", "stride_bn",
         "stride_yt")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_lora_kernel(fn, dtype: str, index_ptrs: tuple, bias: bool, slices: int, cfg: dict, **constexprs):
    """Compile ``fn`` (a fused projection + LoRA kernel) for sm_90 as launched on contiguous tensors: x, W, bias,
    A, B and y of ``dtype``, the int32 ``index_ptrs``, the enabled mask on, the dtype's precisions, unit
    ``UNIT_STRIDES``, 16-byte aligned pointers and ``DIV16`` divisible by 16; ``constexprs``: the kernel's own
    (its tiles); ``cfg``: num_warps and num_stages."""
    ptrs = {n: dtype for n in ("x_ptr", "w_ptr", "bias_ptr", "a_ptr", "b_ptr", "y_ptr")}
    ptrs.update({n: "i32" for n in index_ptrs})
    cexp = dict(HAS_BIAS=bias, HAS_ENABLED=True, NUM_SLICES=slices, UPCAST=False, BASE_PRECISION="ieee",
                FP32_PRECISION="tf32x3", EXPAND_MODE=1 if dtype == "bf16" else 0, **constexprs,
                **{n: 1 for n in UNIT_STRIDES})
    sig = {n: ("*" + ptrs[n]) if n in ptrs else "constexpr" if n in cexp else "i32" for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n in ptrs or n in DIV16}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in cexp.items()}, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def compile_variant(dtype: str, cfg: dict, bias: bool, slices: int):
    return compile_lora_kernel(fused_linear_lora_kernel, dtype, ("mapping_ptr", "enabled_ptr"), bias, slices, cfg,
                               BLOCK_T=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=16,
                               SHRINK_IN_LOOP=cfg.get("SHRINK_IN_LOOP", True))


def report(kernel, label: str) -> bool:
    """Print one line: whether the compiled ``kernel``'s main loop is pipelined (cp.async) and its shared memory
    fits in an H100's; returns whether both hold."""
    shared, pipelined = kernel.metadata.shared, "cp.async" in kernel.asm["ptx"]
    ok = shared <= SHARED_LIMIT and pipelined
    print(f"{'ok' if ok else 'FAILED'} {label}: shared {shared} B, pipelined {pipelined}", flush=True)
    return ok


def main() -> None:
    failed = 0
    # the heuristic's tiles at Qwen3-30B-A3B's projections (qkv, o, router gate); --sweep: also the bf16 sweep
    shapes = [(2048, 5120), (4096, 2048), (2048, 128)]
    variants = []
    for dt, (K, N) in itertools.product(DTYPES, shapes):
        v = (dt, fused_linear_lora_config(1, K, N, 16, DTYPES[dt]).to_json(), True, 3)
        if v not in variants:
            variants.append(v)
    if "--sweep" in sys.argv[1:]:
        variants += [("bf16", cfg, False, 1) for cfg in sweep_configs()]
    for dtype, cfg, bias, slices in variants:
        failed += not report(compile_variant(dtype, cfg, bias, slices), f"{dtype} {cfg} bias {bias} slices {slices}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
