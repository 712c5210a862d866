"""Compile the 17..256-token fused projection + LoRA kernel for an H100/H200 (sm_90) without a GPU: run as a
script, without TRITON_INTERPRET, by test_fused_linear_lora_batch.py (the approach and the checks of
``fused_linear_lora_hopper_compile.py``: types, layouts and dot shapes only the compiler sees; the main loop
pipelined (cp.async); shared memory within an H100's limit).  Variants: the heuristic's tiles at 17, 64 and
256 tokens for Qwen3-30B-A3B's projections (qkv, o, router gate) in bf16, and at 64 tokens (qkv) in
fp16 / fp32, at rank 16, and at ranks 32 / 64 for qkv at 256 tokens; ``--sweep``: also ``batch_sweep_configs()``
in bf16.  Prints one line per variant; exits 1 on failure."""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET")


from benchmarks.kernels.benchmark_fused_linear_lora import batch_sweep_configs  # noqa: E402
from tests.lora.fused_linear_lora_hopper_compile import DTYPES, compile_lora_kernel, report  # noqa: E402
from vllm.lora.ops.triton_ops._fused_linear_lora_batch_kernel import fused_linear_lora_batch_kernel  # noqa: E402
from vllm.lora.ops.triton_ops.fused_linear_lora_batch import batch_config  # noqa: E402
from vllm.triton_utils import next_power_of_2  # noqa: E402


def compile_variant(dtype: str, cfg: dict, T: int, bias: bool, slices: int, rank: int = 16):
    """``cfg``: a sweep config (keys it lacks: the default's, at 4 slots) or the heuristic's."""
    cfg = dict(batch_config(T, 2048, 5120, rank, DTYPES[dtype], 4).to_json(), **cfg)
    return compile_lora_kernel(fused_linear_lora_batch_kernel, dtype,
                               ("mapping_ptr", "sorted_ids_ptr", "counts_ptr", "enabled_ptr"), bias, slices, cfg,
                               LOOP_SLOTS=cfg["LOOP_SLOTS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               BLOCK_K=cfg["BLOCK_K"], BLOCK_R=rank, BLOCK_C=rank * max(cfg["LOOP_SLOTS"], 1),
                               BLOCK_L=4, BLOCK_TAIL=next_power_of_2(T))


def variants(sweep: bool) -> list[tuple]:
    shapes = [(2048, 5120), (4096, 2048), (2048, 128)]  # qkv, o, router gate of Qwen3-30B-A3B
    cases = [("bf16", T, K, N) for T, (K, N) in itertools.product((17, 64, 256), shapes)]
    cases += [(dt, 64, *shapes[0]) for dt in ("fp16", "fp32")]  # the other dtypes at one shape
    out = []
    for dt, T, K, N in cases:
        v = (dt, batch_config(T, K, N, 16, DTYPES[dt]).to_json(), T, True, 3, 16)
        if v not in out:
            out.append(v)
    # ranks 32 and 64 at the widest tiles (qkv at 256 tokens: BLOCK_N 128), where rank-16 stages overflowed
    out += [("bf16", batch_config(256, 2048, 5120, r, DTYPES["bf16"]).to_json(), 256, True, 3, r) for r in (32, 64)]
    if sweep:
        out += [("bf16", cfg, T, False, 1, 16) for cfg in batch_sweep_configs() for T in (64, 256)]
    return out


def main() -> None:
    failed = 0
    for dtype, cfg, T, bias, slices, rank in variants("--sweep" in sys.argv[1:]):
        failed += not report(compile_variant(dtype, cfg, T, bias, slices, rank),
                             f"{dtype} {T} tokens rank {rank} {cfg} bias {bias} slices {slices}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
