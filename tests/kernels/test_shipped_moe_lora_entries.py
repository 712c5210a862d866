"""Every shipped MoE LoRA tuned entry for this GPU runs at its own widths and pair count, as the Punica wrapper
would launch it (the tuned lookup, the small-batch or sorted path by shape), and matches the torch reference.

The tuned files are written by ``benchmarks/kernels/tune_moe.py``, or edited by hand from a benchmark's A/B
(e.g. the split shrink, ``SHRINK_SPLIT_K``, on Mixtral-8x7B's widths): an entry that asks the GPU for more
shared memory than it has, or that the launcher cannot run, fails here instead of in a user's engine.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_shipped_tuned_configs import _load, _parse, _shipped
from tests.utils import assert_close

_LORA_FILES = [n for n in _shipped() if n.startswith("fused_moe_lora_")]


def _top_k(pairs: int, num_experts: int) -> int:
    """The widest of 8 / 4 / 2 / 1 routes, at most a quarter of the experts, that divides the entry's pair count
    (Qwen3-30B-A3B's 8 of 128 and Mixtral-8x7B's 2 of 8; 8 of gpt-oss-20b's 32 where it routes 4)."""
    return next(k for k in (8, 4, 2, 1) if k <= max(1, num_experts // 4) and pairs % k == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", _LORA_FILES)
def test_shipped_moe_lora_entries_run(name):
    from tests.kernels.moe_lora_gpu_cases import BF16, _gpu_layer
    from vllm.lora.ops.moe_lora_align import moe_lora_align_block_size
    from vllm.lora.ops.torch_ops.moe_lora import fused_moe_lora_torch
    from vllm.lora.ops.triton_ops.fused_moe_lora import fused_moe_lora
    from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config, use_small_batch_path

    op, key, device = _parse(name)
    gpu = torch.cuda.get_device_name()
    if device != gpu.replace(" ", "_"):
        pytest.skip(f"tuned for {device}, this GPU is {gpu}")
    w2 = op.endswith("_w2")
    E, K, N, R = key["E"], key["K"], key["N"], key["R"]
    H, I = (N, K) if w2 else (K, N)
    for pairs in sorted(_load(name)):
        top_k = _top_k(pairs, E)
        x, lora_a, lora_b, out, kw, top_k_in, g = _gpu_layer(E, R, pairs // top_k, BF16, w2, H=H, I=I, top_k=top_k)
        small = use_small_batch_path(pairs, E, g["L"], R)
        cfg = get_moe_lora_config(op, num_pairs=pairs, num_experts=E, max_loras=g["L"], rank=R, K=K, N=N,
                                  num_slices=g["S"], dtype=BF16, use_tuned_config=True, device_name=gpu,
                                  small_batch=small)
        alignment = None if small else moe_lora_align_block_size(
            kw["topk_ids"], kw["token_lora_mapping"], num_experts=E, max_loras=g["L"], block_size=cfg.block_size_m,
            adapter_enabled=kw["adapter_enabled"])
        expected = out.float()
        fused_moe_lora_torch(expected, x, lora_a, lora_b, top_k_in=top_k_in, **kw)
        got = out.clone()
        fused_moe_lora(got, x, lora_a, lora_b, top_k_in=top_k_in, alignment=alignment, config=cfg, **kw)
        torch.cuda.synchronize()
        where = f"{name} at {pairs} pairs ({cfg})"
        assert_close(got, expected, BF16, name=where)
        assert_close(got.float() - out.float(), expected - out.float(), BF16, name=f"delta, {where}")
