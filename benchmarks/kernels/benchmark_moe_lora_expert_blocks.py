"""The MoE LoRA deltas of one layer on the experts' own alignment (``moe_lora_expert_blocks.py``, prototype)
against today's sorted path (the (adapter, expert) alignment + the sorted kernel), Qwen3-30B-A3B shape.

What is timed is what the LoRA adds to a layer whose base GEMMs have their expert alignment already: today the
LoRA alignment (three launches) and the w13 (two slices reading one A, as peft's fused adapters run) and w2
sorted kernels; the prototype the w13 and w2 kernels on the base alignment, a program per (block, slot) or one
per block looping over the slots.  CUDA-graph replay with the L2 flushed, median.  Outputs are checked against
today's path first.  Usage: python benchmarks/kernels/benchmark_moe_lora_expert_blocks.py [--tokens 64 256 1024]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.kernels.bench_timing import add_run_args, emit, norm_err, pick_device, run_setup  # noqa: E402

QWEN3 = dict(H=2048, I=768, E=128, top_k=8)
SMOKE = dict(H=64, I=32, E=8, top_k=2)


def base_block(tokens: int) -> int:
    """The bf16 GEMMs' BLOCK_SIZE_M of the shipped H100 / H200 Qwen3 files at this token count."""
    return 16 if tokens <= 64 else 32 if tokens <= 256 else 64


def build(shape: dict, T: int, L: int, R: int, device, gen):
    H, I, E, k = shape["H"], shape["I"], shape["E"], shape["top_k"]
    bf = torch.bfloat16

    def rnd(*size, std=1.0):
        return (torch.randn(*size, generator=gen, device=device) * std).to(bf)

    logits = torch.randn(T, E, generator=gen, device=device)
    weights, ids = torch.softmax(logits, -1).topk(k, -1)
    a13 = rnd(L, E, R, H, std=H ** -0.5)
    b13 = rnd(2, L, E, I, R, std=0.5 * R ** -0.5)
    return dict(x=rnd(T, H), x2=rnd(T * k, I), ids=ids.to(torch.int32), w=(weights / weights.sum(-1, keepdim=True)),
                mapping=(torch.arange(T, device=device) % L).to(torch.int32),
                enabled=torch.tensor([1] * L + [0], dtype=torch.int32, device=device),
                a13=(a13, a13), b13=tuple(b13.unbind(0)), a2=rnd(L, E, R, I, std=I ** -0.5),
                b2=rnd(L, E, H, R, std=0.5 * R ** -0.5), out13=rnd(T * k, 2 * I), out2=rnd(T * k, H))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-loras", type=int, default=4)
    add_run_args(p, smoke="tiny shapes")
    args = p.parse_args()
    device = pick_device(args.smoke)
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config
    from vllm.lora.ops.triton_ops.moe_lora_expert_blocks import fused_moe_lora_expert_blocks
    from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size

    shape = SMOKE if args.smoke else QWEN3
    tokens = [5] if args.smoke else args.tokens
    run = run_setup(args, device)
    L, R, E, k = args.num_loras, args.rank, shape["E"], shape["top_k"]
    dev_name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    rows = []
    for T in tokens:
        gen = torch.Generator(device=device).manual_seed(args.seed + T)
        d = build(shape, T, L, R, device, gen)
        numel = T * k
        cfg = {op: get_moe_lora_config(op, num_pairs=numel, num_experts=E, max_loras=L, rank=R, K=K, N=N,
                                       num_slices=s, dtype=torch.bfloat16, use_tuned_config=True,
                                       device_name=dev_name, small_batch=False)
               for op, K, N, s in (("fused_moe_lora_w13", shape["H"], shape["I"], 2),
                                   ("fused_moe_lora_w2", shape["I"], shape["H"], 1))}
        base = moe_align_block_size(d["ids"], base_block(T), E, use_triton=device.type == "cuda" or None)
        common = dict(topk_ids=d["ids"], topk_weights=d["w"], token_lora_mapping=d["mapping"],
                      adapter_enabled=d["enabled"])

        def sorted_path():
            al = moe_lora_align_block_size(d["ids"], d["mapping"], num_experts=E, max_loras=L,
                                           block_size=cfg["fused_moe_lora_w13"].block_size_m,
                                           adapter_enabled=d["enabled"])
            o13, o2 = d["out13"].clone(), d["out2"].clone()
            fused_moe_lora(o13, d["x"], d["a13"], d["b13"], top_k_in=k, alignment=al,
                           config=cfg["fused_moe_lora_w13"], **common)
            fused_moe_lora(o2, d["x2"], d["a2"], d["b2"], top_k_in=1, alignment=al, mul_routed_weight=True,
                           config=cfg["fused_moe_lora_w2"], **common)
            return torch.cat([o13.float(), o2.float()], 1)

        def expert_blocks(per_slot: bool):
            def fn():
                o13, o2 = d["out13"].clone(), d["out2"].clone()
                fused_moe_lora_expert_blocks(o13, d["x"], d["a13"], d["b13"], align=base, top_k_in=k,
                                             config=cfg["fused_moe_lora_w13"], program_per_slot=per_slot, **common)
                fused_moe_lora_expert_blocks(o2, d["x2"], d["a2"], d["b2"], align=base, top_k_in=1,
                                             mul_routed_weight=True, config=cfg["fused_moe_lora_w2"],
                                             program_per_slot=per_slot, **common)
                return torch.cat([o13.float(), o2.float()], 1)
            return fn

        want = sorted_path()
        for per_slot in (True, False):
            err = norm_err(expert_blocks(per_slot)(), want)
            if err > 1e-2:
                sys.exit(f"{T} tokens, program_per_slot={per_slot}: relative error {err:.2e} against the sorted path")
        t_sorted = run.timed(sorted_path)
        t_slot, t_loop = run.timed(expert_blocks(True)), run.timed(expert_blocks(False))
        groups = int(torch.unique(d["mapping"].long()[:, None].expand(-1, k).reshape(-1) * E
                                  + d["ids"].reshape(-1).long()).numel())
        lora_bytes = groups * R * (shape["H"] + 2 * shape["I"] + shape["I"] + shape["H"]) * 2
        best = min(t_slot, t_loop)
        rows.append(f"| {T} | {base.block_size} | {t_sorted:.1f} | {t_slot:.1f} | {t_loop:.1f} | "
                    f"{t_sorted / best:.2f} | {lora_bytes / 1e6:.1f} | {lora_bytes / best / 1e3:.0f} | "
                    f"{100 * lora_bytes / best / 1e-6 / run.bandwidth:.0f} % | {run.gpu} |")
    head = (f"MoE LoRA of one layer, {'smoke' if args.smoke else 'Qwen3-30B-A3B'} shape, rank {R}, {L} adapters "
            "(token t on slot t % L), w13 two slices reading one A; us, CUDA-graph replay, L2 flushed\n\n"
            "| tokens | expert block | sorted: LoRA align + kernels | expert blocks, a program per slot | "
            "expert blocks, slot loop | sorted / best | adapter MB | GB/s (best) | % of copy bandwidth | GPU |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    emit(head + "\n" + "\n".join(rows), args.out)


if __name__ == "__main__":
    main()
