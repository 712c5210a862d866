"""The int4 dot kernel with UNPACK 3 compiled for sm_90 through Triton's own JIT binder, without a GPU: a stub
driver names an sm_90 target, and each launch of ``invoke_int4_moe_gemm`` becomes a warm-up (compile, no
launch), so the arguments are specialised exactly as on a GPU (alignment, divisibility, constants).  The
cases of ``test_unpack_modes_on_gpu`` and ``test_unpack3_on_gpu_fits_and_is_right`` (1 token unsorted, split
and not; 4 and 16 rows per expert sorted; fp16 and bf16; 2-4 stages).  Prints "ok ..." per compiled config
whose shared memory is within ``int4_dot_smem``'s bound, else "FAILED ..." and exits 1.  Run without
TRITON_INTERPRET, by test_int4_unpack3_fit.py."""
import dataclasses
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Sm90Stub:
    """What JITFunction.run asks of the driver before it compiles."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def main() -> None:
    driver.set_active(_Sm90Stub())
    from tests.kernels.test_int4_moe_gemm import _packed
    from tests.quantization.int4_moe_setup import random_int4
    from vllm.model_executor.layers.fused_moe.ops import _int4_moe_gemm_kernel as kernels
    from vllm.model_executor.layers.fused_moe.ops import int4_moe_gemm as mod
    from vllm.model_executor.layers.fused_moe.ops.int4_dot_smem import unpack3_shared_bytes

    compiled = []
    for fn in (kernels._int4_moe_gemm_kernel, kernels._split_k_reduce_kernel):
        def warm(*args, grid, warmup, _run=fn.run, _name=fn.__name__, **kwargs):
            kern = _run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((_name, kern.metadata.shared))
            return kern
        fn.run = warm

    gen = torch.Generator().manual_seed(0)
    E, top_k, N, K, group = 32, 8, 1536, 2048, 128  # Qwen3-30B-A3B's GEMM1, fewer experts (4 distinct)
    pw = _packed([random_int4(N, K, group, True, False, gen) for _ in range(4)] * (E // 4), group, True, False, "cpu")
    failed = 0
    for dtype, M, stages in itertools.product((torch.float16, torch.bfloat16), (1, 16, 64), (4, 3, 2)):
        pairs = M * top_k
        unsorted = mod.use_unsorted_int4_gemm(pairs, E)
        base = mod.get_int4_moe_config(pairs, E, N, K, group, dtype, sorted_pairs=not unsorted, gemv=False)
        for split in sorted({1, base.split_k}):
            cfg = dataclasses.replace(base, unpack=3, split_k=split, num_stages=stages)
            if unsorted:
                route = dict(pair_expert_ids=torch.zeros(pairs, dtype=torch.int32))
            else:  # the alignment's shapes (its values are not read by a warm-up)
                blocks = -(-pairs // cfg.block_size_m) + E
                route = dict(sorted_token_ids=torch.zeros(blocks * cfg.block_size_m, dtype=torch.int32),
                             block_expert_ids=torch.zeros(blocks, dtype=torch.int32),
                             num_tokens_post_padded=torch.zeros(1, dtype=torch.int32))
            compiled.clear()
            a = torch.zeros(M, K, dtype=dtype)
            mod.invoke_int4_moe_gemm(a, pw, torch.empty(pairs, N, dtype=dtype), top_k_in=top_k, config=cfg, **route)
            shared = dict(compiled)["_int4_moe_gemm_kernel"]
            bound = unpack3_shared_bytes(cfg.block_size_m, cfg.block_size_n, cfg.block_size_k, stages)
            good = shared <= bound
            failed += not good
            print(f"{'ok' if good else 'FAILED'} {dtype} {M} tokens {'unsorted' if unsorted else 'sorted'} "
                  f"{cfg.block_size_m}x{cfg.block_size_n}x{cfg.block_size_k} split {split} stages {stages}: "
                  f"{shared} B compiled by the JIT, bound {bound}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
