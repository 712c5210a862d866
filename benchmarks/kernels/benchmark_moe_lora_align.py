"""The MoE LoRA (adapter, expert) align at decode sizes: fused virtual ids vs torch ops first.

What is timed (CUDA graph replay, L2 flushed, median of ``--reps``):
- ``fused``: ``moe_lora_align_block_size`` on CUDA, whose count/scatter kernels compute the
  virtual expert ids themselves (three launches), for each scan warp count in ``--scan-warps``;
- ``torch ids``: the virtual ids made with torch ops, then the plain Triton align (the
  previous implementation).
Correctness first: both give identical integer outputs (sorted ids, block ids, totals).

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_lora_align.py [--tokens 1 16 64 256] [--out t.md]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_moe_lora import emit, time_cuda  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--scan-warps", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from vllm.lora.ops.moe_lora_align import lora_virtual_expert_ids, moe_lora_align_block_size
    from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab

    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    E, k, L = args.experts, args.top_k, args.num_loras
    enabled = torch.ones(L + 1, dtype=torch.int32, device=dev)
    enabled[-1] = 0
    lines = [f"# MoE LoRA align, {torch.cuda.get_device_name()}: {E} experts, top-{k}, {L} adapters, block {args.block}",
             "", "| tokens | torch ids + align (us) | " + " | ".join(f"fused, scan {w} warps (us)" for w in args.scan_warps)
             + " |", "|---:|---:|" + "---:|" * len(args.scan_warps)]
    for M in args.tokens:
        topk = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(M)]).to(torch.int32)
        mapping = (torch.arange(M, device=dev) % L).to(torch.int32)
        kw = dict(num_experts=E, max_loras=L, block_size=args.block, adapter_enabled=enabled)

        def old():
            vids = lora_virtual_expert_ids(topk, mapping, num_experts=E, max_loras=L, adapter_enabled=enabled)
            return mab.moe_align_block_size(vids, args.block, E * L).sorted_token_ids

        def new():
            return moe_lora_align_block_size(topk, mapping, use_triton=True, **kw).sorted_token_ids

        ref = moe_lora_align_block_size(topk, mapping, use_triton=False, **kw)
        got = moe_lora_align_block_size(topk, mapping, use_triton=True, **kw)
        assert torch.equal(ref.sorted_token_ids, got.sorted_token_ids), "fused align differs from the torch path"
        assert torch.equal(ref.block_virtual_ids, got.block_virtual_ids)
        assert torch.equal(ref.num_tokens_post_padded, got.num_tokens_post_padded)
        row = [time_cuda(old, flush, args.reps, True)[0]]
        saved = dict(mab.SCAN_WARPS)
        for w in args.scan_warps:
            mab.SCAN_WARPS.clear()
            mab.SCAN_WARPS[1 << 30] = w
            row.append(time_cuda(new, flush, args.reps, True)[0])
        mab.SCAN_WARPS.clear()
        mab.SCAN_WARPS.update(saved)
        lines.append(f"| {M} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        print(lines[-1], flush=True)
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
