"""One fused-MoE layer serving several LoRA adapters in one batch.

Builds a Qwen3-MoE-shaped layer (small by default) with random weights, loads
three adapters of different ranks into LoRA slots, runs one batch in which
tokens use the base model or any of the adapters, and checks every token
against an independent float64 loop reference.  Prints, per adapter, how far
the layer is from the reference and how much the adapter moved the output.

    python examples/moe_layer_demo.py [--tokens 64] [--backend triton|torch]
"""
from __future__ import annotations

import argparse
import sys

import torch

from vllm.config.lora import LoRAConfig
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.model_executor.layers.fused_moe.layer import FusedMoE
from vllm.model_executor.layers.fused_moe.router import fused_topk


def reference(x, w13, w2, tw, ti, adapters, slots):
    """float64 per token and expert: W2 silu-gated(W13 x + B1 A1 x) + B2 A2 h, router-weighted."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    I = w2.shape[2]
    for m in range(x.shape[0]):
        ad = adapters.get(slots[m])
        for j in range(ti.shape[1]):
            e = int(ti[m, j])
            xm = x[m].double()
            h = w13[e].double() @ xm
            if ad is not None:
                h += torch.cat([b[e].double() @ (a[e].double() @ xm) for a, b in zip(ad["w13_a"], ad["w13_b"])])
            g = h[:I] / (1 + torch.exp(-h[:I])) * h[I:]
            y = w2[e].double() @ g
            if ad is not None:
                y += ad["w2_b"][e].double() @ (ad["w2_a"][e].double() @ g)
            out[m] += float(tw[m, j]) * y
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--backend", default=None, help="MoE backend (default: automatic)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    E, H, I, k, R = args.experts, args.hidden, args.intermediate, args.top_k, 16

    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    layer = FusedMoE(E, k, H, I, params_dtype=dtype, device=device, moe_backend=args.backend, lora_enabled=True)
    layer.load_fused_experts(gate_up=w13, down=w2)
    layer.process_weights_after_loading()  # weights in place: build the kernel (backend chosen here)
    lora = FusedMoEWithLoRA(layer)
    lora.create_lora_weights(3, LoRAConfig(max_loras=3, max_lora_rank=R))
    punica = get_punica_wrapper(8192, 3, device)
    lora.set_mapping(punica)

    adapters = {}
    for slot, (name, rank) in enumerate([("rank16", 16), ("rank8", 8), ("rank4", 4)]):
        ad = {"name": name,
              "w13_a": [torch.randn(E, rank, H, generator=g) / H**0.5 for _ in range(2)],
              "w13_b": [torch.randn(E, I, rank, generator=g) * 0.5 / rank**0.5 for _ in range(2)],
              "w2_a": torch.randn(E, rank, I, generator=g) / I**0.5,
              "w2_b": torch.randn(E, H, rank, generator=g) * 0.5 / rank**0.5}
        lora.set_lora(slot, w13_lora_a=ad["w13_a"], w13_lora_b=ad["w13_b"], w2_lora_a=ad["w2_a"],
                      w2_lora_b=ad["w2_b"])
        adapters[slot] = ad

    M = args.tokens
    slots = [(t % 4) - 1 for t in range(M)]  # base, rank16, rank8, rank4, base, ...
    x = torch.randn(M, H, generator=g)
    logits = torch.randn(M, E, generator=g)
    punica.update_metadata(slots)
    out = lora(x.to(device, dtype), logits.to(device)).float().cpu()

    tw, ti = fused_topk(logits, k, renormalize=True)
    ref = reference(x.to(dtype).float(), w13.to(dtype).float(), w2.to(dtype).float(), tw, ti, adapters, slots)
    base = reference(x.to(dtype).float(), w13.to(dtype).float(), w2.to(dtype).float(), tw, ti, {}, slots)
    bound = 3e-2 if dtype == torch.bfloat16 else 2e-3
    print(f"device={device} dtype={dtype} backend={layer.moe_backend.value} tokens={M} experts={E} top_k={k}")
    print(f"{'adapter':<8} {'tokens':>6} {'max err / max |ref|':>20} {'adapter effect':>15}  verdict")
    ok = True
    for slot in [-1, 0, 1, 2]:
        rows = [m for m in range(M) if slots[m] == slot]
        if not rows:
            continue
        r, o, b = ref[rows], out[rows].double(), base[rows]
        err = float((o - r).abs().max() / r.abs().max())
        effect = float((r - b).abs().max() / b.abs().max())
        good = err <= bound
        ok &= good
        name = "base" if slot < 0 else adapters[slot]["name"]
        print(f"{name:<8} {len(rows):>6} {err:>20.2e} {effect:>15.2f}  {'OK' if good else 'MISMATCH'}")
    print("all tokens match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
