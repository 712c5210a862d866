"""The MoE LoRA alignments at decode sizes: "align once" vs two aligns, and the fused virtual ids vs torch ops.

Table 1, align once (issue 11), at the layer's own block sizes (``--block`` / ``--lora-block``, default:
what ``TritonExperts`` and the Punica wrapper pick for Qwen3-30B-A3B, H=2048, I=768, rank 16):
- ``separate``: the expert alignment (``moe_align_block_size`` on the local ids) and then the
  (adapter, expert) alignment (``moe_lora_align_block_size``): six launches;
- ``one pass``: ``moe_align_with_lora``, both in three launches (what the layer runs when both sort);
- ``base only``: the expert alignment alone, i.e. what the step pays without LoRA.
Table 2: ``moe_lora_align_block_size`` (virtual ids inside the kernels) per scan warp count in
``--scan-warps`` vs the virtual ids made with torch ops before the plain align (the previous implementation).
Table 3 (``--chunks 256 512 1024``): the expert align and the LoRA align per count / scatter chunk (pairs per
program, ``moe_align_block_size._CHUNK``).

Correctness first: every row checks that the compared ops give identical integer outputs (sorted ids,
block ids, used lengths, padded counts).  Timing: CUDA graph replay, L2 flushed, median of ``--reps``.
Rows where the layer takes the per-pair paths instead (``pairwise_alignment`` + the small-batch LoRA
kernel, e.g. 1 token) are marked; they are timed all the same.

    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_lora_align.py [--tokens 1 16 64 256 1024] [--out t.md]
    PYTHONPATH=. python benchmarks/kernels/benchmark_moe_lora_align.py --smoke   # CPU: the checks only, tiny
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.kernels.benchmark_moe_lora import emit, pick_device, time_cuda  # noqa: E402

QWEN3 = dict(H=2048, I=768, rank=16)  # Qwen3-30B-A3B's expert widths (TP 1) and the LoRA rank of the blocks


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not torch.equal(a, b):
        raise AssertionError(f"{what} differs between the compared aligns")


def _blocks(args: argparse.Namespace, pairs: int, E: int, L: int, device: torch.device) -> tuple[int, int]:
    """(expert block, LoRA block): the flags, or the layer's own choices for this many pairs."""
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config
    from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import get_two_gemm_configs

    H, I, R = QWEN3["H"], QWEN3["I"], QWEN3["rank"]
    base = args.block or get_two_gemm_configs(pairs, E, 2 * I, H, I, args.top_k, torch.bfloat16)[0].block_size_m
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lora = args.lora_block or get_moe_lora_config("fused_moe_lora_w13", num_pairs=pairs, num_experts=E, max_loras=L,
                                                  rank=R, K=H, N=I, num_slices=2, dtype=torch.bfloat16,
                                                  use_tuned_config=False, device_name=name).block_size_m
    return base, lora


def _inputs(M: int, E: int, k: int, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(M)
    topk = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(M)]).to(torch.int32).to(device)
    mapping = (torch.arange(M) % L).to(torch.int32).to(device)  # token t on adapter t % L
    enabled = torch.ones(L + 1, dtype=torch.int32, device=device)
    enabled[-1] = 0
    return topk, mapping, enabled


def align_once_table(args: argparse.Namespace, device: torch.device, flush: torch.Tensor) -> list[str]:
    from vllm.lora.ops.moe_lora_align import (
        MoELoRAAlignPlan,
        moe_align_with_lora,
        moe_lora_align_block_size,
        one_pass_pays,
    )
    from vllm.lora.ops.triton_ops.moe_lora_config import use_small_batch_path
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import (
        moe_align_block_size,
        use_pairwise_alignment,
    )

    E, k, L = args.experts, args.top_k, args.num_loras
    timed = device.type == "cuda"
    lines = [f"## Align once: {E} experts, top-{k}, {L} adapters (token t on adapter t % {L})", "",
             "| tokens | blocks (expert / LoRA) | base only (us) | separate (us) | one pass (us) | one pass / separate "
             "| layer uses one pass |", "|---:|---:|---:|---:|---:|---:|---|"]
    for M in args.tokens:
        topk, mapping, enabled = _inputs(M, E, k, L, device)
        pairs = M * k
        block, lora_block = _blocks(args, pairs, E, L, device)
        plan = MoELoRAAlignPlan(token_lora_mapping=mapping, adapter_enabled=enabled, num_experts=E, max_loras=L,
                                block_size=lora_block)
        lkw = dict(num_experts=E, max_loras=L, block_size=lora_block, adapter_enabled=enabled, use_triton=True)

        def base_only() -> torch.Tensor:
            return moe_align_block_size(topk, block, E, use_triton=True).sorted_token_ids

        def separate() -> torch.Tensor:
            moe_align_block_size(topk, block, E, use_triton=True)
            return moe_lora_align_block_size(topk, mapping, **lkw).sorted_token_ids

        def one_pass() -> torch.Tensor:
            return moe_align_with_lora(topk, block, E, plan, use_triton=True)[1].sorted_token_ids

        base, lora = moe_align_with_lora(topk, block, E, plan, use_triton=True)
        ref_base = moe_align_block_size(topk, block, E, use_triton=True)
        ref_lora = moe_lora_align_block_size(topk, mapping, **lkw)
        for f in ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded", "group_padded_counts"):
            _same(getattr(base, f), getattr(ref_base, f), f"expert alignment {f}")
        for f in ("sorted_token_ids", "block_virtual_ids", "num_tokens_post_padded", "slot_padded_counts"):
            _same(getattr(lora, f), getattr(ref_lora, f), f"LoRA alignment {f}")
        uses = (not use_pairwise_alignment(pairs, E) and not use_small_batch_path(pairs, E, L, QWEN3["rank"])
                and one_pass_pays(block, lora_block))
        if timed:
            t = [time_cuda(fn, flush, args.reps, True)[0] for fn in (base_only, separate, one_pass)]
            cells = [f"{v:.1f}" for v in t] + [f"{t[2] / t[1]:.2f}"]
        else:
            cells = ["checked"] * 3 + ["-"]
        lines.append(f"| {M} | {block} / {lora_block} | " + " | ".join(cells) + f" | {'yes' if uses else 'no'} |")
        print(lines[-1], flush=True)
    return lines


def fused_ids_table(args: argparse.Namespace, device: torch.device, flush: torch.Tensor) -> list[str]:
    from vllm.lora.ops.moe_lora_align import lora_virtual_expert_ids, moe_lora_align_block_size
    from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab

    E, k, L = args.experts, args.top_k, args.num_loras
    block = args.lora_block or 16
    lines = [f"## Fused virtual ids: block {block}", "",
             "| tokens | torch ids + align (us) | " + " | ".join(f"fused, scan {w} warps (us)" for w in args.scan_warps)
             + " |", "|---:|---:|" + "---:|" * len(args.scan_warps)]
    for M in args.tokens:
        topk, mapping, enabled = _inputs(M, E, k, L, device)
        kw = dict(num_experts=E, max_loras=L, block_size=block, adapter_enabled=enabled)

        def old() -> torch.Tensor:
            vids = lora_virtual_expert_ids(topk, mapping, num_experts=E, max_loras=L, adapter_enabled=enabled)
            return mab.moe_align_block_size(vids, block, E * L).sorted_token_ids

        def new() -> torch.Tensor:
            return moe_lora_align_block_size(topk, mapping, use_triton=True, **kw).sorted_token_ids

        ref = moe_lora_align_block_size(topk, mapping, use_triton=False, **kw)
        got = moe_lora_align_block_size(topk, mapping, use_triton=True, **kw)
        for f in ("sorted_token_ids", "block_virtual_ids", "num_tokens_post_padded", "slot_padded_counts"):
            _same(getattr(ref, f).cpu(), getattr(got, f).cpu(), f"fused align {f} (vs the torch path)")
        if device.type != "cuda":
            lines.append(f"| {M} | checked |" + " - |" * len(args.scan_warps))
            continue
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
    return lines


def chunk_table(args: argparse.Namespace, device: torch.device, flush: torch.Tensor) -> list[str]:
    """The aligns per count / scatter chunk (``moe_align_block_size._CHUNK``: pairs per program; the scan then
    walks ceil(pairs / chunk) per-chunk histograms), each checked equal to the torch path first."""
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab

    E, k, L = args.experts, args.top_k, args.num_loras
    lines = [f"## Count / scatter chunk: pairs per program (default {mab._CHUNK})", "",
             "| tokens | blocks (expert / LoRA) | " + " | ".join(f"chunk {c}: expert / LoRA align (us)"
                                                          for c in args.chunks) + " |",
             "|---:|---:|" + "---:|" * len(args.chunks)]
    saved = mab._CHUNK
    try:
        for M in args.tokens:
            topk, mapping, enabled = _inputs(M, E, k, L, device)
            block, lora_block = _blocks(args, M * k, E, L, device)
            lkw = dict(num_experts=E, max_loras=L, block_size=lora_block, adapter_enabled=enabled)
            ref = mab.moe_align_block_size(topk, block, E, use_triton=False)
            ref_lora = moe_lora_align_block_size(topk, mapping, use_triton=False, **lkw)
            cells = []
            for c in args.chunks:
                mab._CHUNK = c

                def base() -> torch.Tensor:
                    return mab.moe_align_block_size(topk, block, E, use_triton=True).sorted_token_ids

                def lora() -> torch.Tensor:
                    return moe_lora_align_block_size(topk, mapping, use_triton=True, **lkw).sorted_token_ids

                got = mab.moe_align_block_size(topk, block, E, use_triton=True)
                got_lora = moe_lora_align_block_size(topk, mapping, use_triton=True, **lkw)
                for f in ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded"):
                    _same(getattr(got, f).cpu(), getattr(ref, f).cpu(), f"chunk {c}: expert alignment {f}")
                for f in ("sorted_token_ids", "block_virtual_ids", "num_tokens_post_padded", "slot_padded_counts"):
                    _same(getattr(got_lora, f).cpu(), getattr(ref_lora, f).cpu(), f"chunk {c}: LoRA alignment {f}")
                if device.type == "cuda":
                    cells.append(" / ".join(f"{time_cuda(fn, flush, args.reps, True)[0]:.1f}" for fn in (base, lora)))
                else:
                    cells.append("checked")
            lines.append(f"| {M} | {block} / {lora_block} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finally:
        mab._CHUNK = saved
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="default 1 16 64 256 1024 (smoke: 1 9)")
    p.add_argument("--experts", type=int, default=None, help="default 128 (smoke: 8)")
    p.add_argument("--top-k", type=int, default=None, help="default 8 (smoke: 2)")
    p.add_argument("--num-loras", type=int, default=4)
    p.add_argument("--block", type=int, default=None, help="expert M-block (default: the layer's choice)")
    p.add_argument("--lora-block", type=int, default=None, help="LoRA M-block (default: the wrapper's choice)")
    p.add_argument("--scan-warps", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--chunks", nargs="+", type=int, default=None,
                   help="also time the aligns per count / scatter chunk (powers of two, e.g. 256 512 1024)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny sizes; without CUDA the equality checks only")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = pick_device(args.smoke)
    args.tokens = args.tokens or ([1, 9] if args.smoke else [1, 16, 64, 256, 1024])
    args.experts = args.experts or (8 if args.smoke else 128)
    args.top_k = args.top_k or (2 if args.smoke else 8)
    flush = torch.empty(256 << 20 if device.type == "cuda" else 0, dtype=torch.uint8, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter, not timed)"
    lines = [f"# MoE LoRA aligns, {name}", ""] + align_once_table(args, device, flush) + [""]
    lines += fused_ids_table(args, device, flush)
    if args.chunks:
        if any(c < 16 or c & (c - 1) for c in args.chunks):
            raise SystemExit(f"--chunks must be powers of two >= 16, got {args.chunks}")
        lines += [""] + chunk_table(args, device, flush)
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
