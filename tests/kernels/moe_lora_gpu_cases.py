"""GPU cases of the MoE LoRA op at realistic shapes (Qwen3-30B-A3B-like), shared by the one-launch tests
(test_fused_moe_lora.py), the split-K tests (test_moe_lora_split.py) and the small-batch kernels' tests
(test_moe_lora_pair_prefetch.py)."""
from __future__ import annotations

import torch

from tests.utils import assert_close
from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch
from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config

BF16 = torch.bfloat16


def _gpu_layer(E, R, M, dtype, w2: bool, H: int = 2048, I: int = 768, top_k: int = 8):
    """Qwen3-30B-A3B's widths by default (H, I, top_k: e.g. Mixtral-8x7B's 4096, 14336, 2 with E = 8)."""
    L = 4
    S, K, N = (1, I, H) if w2 else (2, H, I)
    dev = torch.device("cuda")
    a = (torch.randn(S, L, E, R, K, device=dev) / K**0.5).to(dtype)
    b = (torch.randn(S, L, E, N, R, device=dev) / R**0.5).to(dtype)
    logits = torch.randn(M, E, device=dev)
    w, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)  # norm_topk_prob
    kw = dict(topk_ids=ids.to(torch.int32), topk_weights=w, mul_routed_weight=w2,
              token_lora_mapping=(torch.arange(M, device=dev) % (L + 1) - 1).to(torch.int32),  # incl. no adapter
              adapter_enabled=torch.tensor([1, 1, 1, 1, 0], dtype=torch.int32, device=dev))
    x = torch.randn(M * top_k if w2 else M, K, device=dev).to(dtype)
    # Start values about as large as the delta (w2's is scaled by the router weight), so
    # the rounding of out itself does not swamp the delta check.
    out = (torch.randn(M * top_k, S * N, device=dev) * (0.1 if w2 else 1.0)).to(dtype)
    return x, tuple(a.unbind(0)), tuple(b.unbind(0)), out, kw, (1 if w2 else top_k), dict(E=E, L=L, R=R, K=K, N=N, S=S)


def check_graph_replay(num_experts: int, cfg) -> None:
    """Align + the fused op (tiles ``cfg``; None: the heuristic's) captured once in a CUDA graph, replayed
    with new routing and adapters, against the torch reference."""
    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(num_experts, 16, 64, BF16, False)
    if cfg is None:
        cfg = get_moe_lora_config("fused_moe_lora_w13", num_pairs=kw["topk_ids"].numel(), num_experts=num_experts,
                                  max_loras=4, rank=16, K=g["K"], N=g["N"], num_slices=2, dtype=BF16,
                                  use_tuned_config=False, device_name=torch.cuda.get_device_name())
    start = out.clone()

    def step():
        out.copy_(start)
        al = moe_lora_align_block_size(kw["topk_ids"], kw["token_lora_mapping"], num_experts=num_experts, max_loras=4,
                                       block_size=cfg.block_size_m, adapter_enabled=kw["adapter_enabled"])
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, alignment=al, config=cfg, **kw)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    kw["topk_ids"].copy_(torch.randn(64, num_experts, device="cuda").topk(8, dim=-1).indices)
    kw["token_lora_mapping"].copy_(torch.randint(-1, 4, (64,), device="cuda"))
    kw["adapter_enabled"][2] = 0
    graph.replay()
    expected = start.float()
    fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
    assert_close(out, expected, BF16)


def check_pair_graph_replay(E: int, M: int, w2: bool, **widths: int) -> None:
    """The small-batch path (no alignment; the kernel the caller forced through ``PAIR_KERNEL``) of a rank-16
    layer at ``M`` tokens, 4 slots (one token without an adapter), captured in a CUDA graph and replayed twice
    with new routing and slots, against the torch reference.  widths: ``_gpu_layer``'s H, I, top_k."""
    x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(E, 16, M, BF16, w2, **widths)
    top_k = kw["topk_ids"].shape[1]
    start = out.clone()

    def step():
        out.copy_(start)
        fused_moe_lora(out, x, lora_a, lora_b, top_k_in=top_k_in, **kw)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        kw["topk_ids"].copy_(torch.randn(M, E, device="cuda", generator=gen).topk(top_k, dim=-1).indices)
        kw["token_lora_mapping"].copy_(torch.randint(-1, 4, (M,), device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        expected = start.float()
        fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
        assert_close(out.float(), expected, BF16)
