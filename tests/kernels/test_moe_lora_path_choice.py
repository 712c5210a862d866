"""The MoE LoRA path choice and its tile configs: per-pair (small-batch) vs sorted, decided once per layer
(``PunicaWrapperBase._small_batch``, ``moe_lora_config.use_small_batch_path``), the tiles of the path
taken (``get_moe_lora_config(small_batch=)``), tuned files and their errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vllm.lora.ops.triton_ops.moe_lora_config import get_moe_lora_config, use_small_batch_path

BF16 = torch.bfloat16
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_layers_w13_and_w2_take_one_path(monkeypatch):
    """The path is decided once per layer, at the larger kernel rank of w13 and w2, and both ops' tiles
    follow it: w13 at rank 64 and w2 at rank 32 over 512 pairs (64 Qwen3 tokens) sort (factor 8 above rank
    32), so w2 gets the sorted path's tiles, not the per-pair ones its own rank would pick."""
    from types import SimpleNamespace

    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    def stacked(rank):
        return (torch.empty(4, 128, rank, 8),)

    punica = PunicaWrapperGPU(64, 4, torch.device("cpu"))
    ctx = SimpleNamespace(w13_lora_a_stacked=stacked(64), w2_lora_a_stacked=stacked(32), local_num_experts=128,
                          max_loras=4)
    assert not punica._small_batch(ctx, 512) and punica._small_batch(ctx, 64)
    ctx.w13_lora_a_stacked = stacked(32)
    assert punica._small_batch(ctx, 512)
    ctx.w2_lora_a_stacked = stacked(64)  # either op's rank counts
    assert not punica._small_batch(ctx, 512)
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(mc, "triton_interpreting", lambda: False)  # the GPU heuristic's tiles
    mc._cached_config.cache_clear()
    common = dict(num_pairs=512, num_experts=128, max_loras=4, rank=32, K=768, N=2048, num_slices=1, dtype=BF16,
                  use_tuned_config=False, device_name="NVIDIA H200")
    own = get_moe_lora_config("fused_moe_lora_w2", **common)  # rank 32 alone: the per-pair path's tiles
    forced = get_moe_lora_config("fused_moe_lora_w2", small_batch=False, **common)
    assert (own.block_size_k, own.num_warps) == (512, 8) and forced.block_size_k == 128
    assert get_moe_lora_config("fused_moe_lora_w2", small_batch=True, **common) == own
    mc._cached_config.cache_clear()
    # add_lora_w2 asks for the tiles of the path w13 took (its routing), not its own rank's
    from vllm.lora.punica_wrapper.punica_base import MoELoRARouting

    asked = []
    monkeypatch.setattr(punica, "_config", lambda op, **kw: asked.append((op, kw["small_batch"])))
    monkeypatch.setattr(punica, "_fused", lambda *a, **kw: None)
    ctx.w2_lora_b_stacked, ctx.use_tuned_config, ctx.fully_sharded, ctx.tp_size = (torch.empty(4, 128, 16, 32),), \
        False, False, 1
    ctx.adapter_enabled = torch.ones(5, dtype=torch.int32)
    for alignment, small in ((object(), False), (None, True)):
        routing = MoELoRARouting(alignment=alignment, token_lora_mapping=torch.zeros(8, dtype=torch.int32),
                                 num_pairs=8)
        punica.add_lora_w2(torch.zeros(8, 16), torch.zeros(8, 8), ctx, routing=routing,
                           topk_ids=torch.zeros(8, 1, dtype=torch.int32), topk_weights=torch.ones(8, 1),
                           mul_routed_weight=True)
        assert asked.pop() == ("fused_moe_lora_w2", small)


def test_config_and_path_choice(tmp_path, monkeypatch):
    # default (H200 A/B): per-pair while pairs <= 2 x experts x slots and pairs <= 1024 (128 Qwen3 tokens x top-8)
    assert use_small_batch_path(8, 128, 4, 16) and use_small_batch_path(1024, 128, 4, 32)
    assert use_small_batch_path(8, 4, 1, 16) and not use_small_batch_path(9, 4, 1, 16)
    assert not use_small_batch_path(1025, 128, 4, 16)
    assert use_small_batch_path(64, 8, 4, 16) and not use_small_batch_path(65, 8, 4, 16)  # Mixtral: 32 tokens
    assert use_small_batch_path(1024, 128, 16, 16) and not use_small_batch_path(1025, 128, 16, 16)  # the cap
    # above kernel rank 32 upstream's factor 8 (rank 64 lost on the wide path)
    assert use_small_batch_path(64, 128, 4, 64) and not use_small_batch_path(65, 128, 4, 64)
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(mc, "SMALL_BATCH_PAIRS_FACTOR", 8)  # the knob benchmark_moe_lora --pair-path-factor sets
    assert use_small_batch_path(64, 128, 4, 16) and not use_small_batch_path(65, 128, 4, 16)
    monkeypatch.undo()
    common = dict(num_experts=128, max_loras=4, rank=16, K=2048, N=768, num_slices=2, dtype=BF16)
    for pairs in (8, 512, 32768):
        cfg = get_moe_lora_config("fused_moe_lora_w13", num_pairs=pairs, use_tuned_config=False,
                                  device_name="NVIDIA H100 80GB HBM3", **common)
        assert cfg.block_size_m >= 16 and cfg.num_n_splits >= 1 and cfg.block_size_n >= 16
    name = "fused_moe_lora_w13,E=128,K=2048,N=768,R=16,device_name=NVIDIA_H100_80GB_HBM3.json"
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_SIZE_N": 32}, "256": {"BLOCK_SIZE_N": 256}}))
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    cfg = get_moe_lora_config("fused_moe_lora_w13", num_pairs=2000, use_tuned_config=True,
                              device_name="NVIDIA H100 80GB HBM3", num_tokens=250, **common)
    heuristic = get_moe_lora_config("fused_moe_lora_w13", num_pairs=2000, use_tuned_config=False,
                                    device_name="NVIDIA H100 80GB HBM3", **common)
    assert heuristic.block_size_n != 256
    assert cfg == dataclasses.replace(heuristic, block_size_n=256)  # tuned value, heuristic fills the rest
    # An unknown key in a tuned file is an error naming the file, not silently dropped.
    (tmp_path / name).write_text(json.dumps({"1": {"BLOCK_SIZE_N": 32, "SPLIT_K": 2}}))
    from vllm.kernel_configs import clear_cache

    clear_cache()
    try:
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['SPLIT_K'\]") as info:
            get_moe_lora_config("fused_moe_lora_w13", num_pairs=8, use_tuned_config=True,
                                device_name="NVIDIA H100 80GB HBM3", **common)
    finally:
        clear_cache()
    assert name in str(info.value)
