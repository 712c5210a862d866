"""A LoRA MoE layer on Triton with ``moe_lora_expert_blocks.EXPERT_BLOCKS`` on: on the sorted path its w13 and w2
LoRA run on the experts' own alignment - no (adapter, expert) alignment is made, the expert-block kernels
launch - and the output matches the fp32 reference and the layer with the switch off; per-pair-sized steps
and the switch off keep today's path.  Fused (one A) and per-expert adapters, tokens without an adapter.
"""
import pytest
import torch

from tests.lora.lora_moe_harness import Harness
from tests.utils import assert_close
from vllm.lora.ops import moe_lora_align
from vllm.lora.ops.triton_ops import moe_lora_expert_blocks as eb
from vllm.lora.punica_wrapper import punica_gpu

F32 = torch.float32


@pytest.fixture
def calls(monkeypatch):
    """Counts of the LoRA alignments made and of the expert-block launches."""
    seen = {"lora_align": 0, "expert_blocks": 0}

    def counting(name, real):
        def fn(*args, **kw):
            seen[name] += 1
            return real(*args, **kw)
        return fn

    monkeypatch.setattr(moe_lora_align, "moe_lora_align_block_size",
                        counting("lora_align", moe_lora_align.moe_lora_align_block_size))
    monkeypatch.setattr(moe_lora_align, "align_with_lora_groups_triton",
                        counting("lora_align", moe_lora_align.align_with_lora_groups_triton))
    monkeypatch.setattr(eb, "fused_moe_lora_expert_blocks", counting("expert_blocks", eb.fused_moe_lora_expert_blocks))
    return seen


@pytest.mark.parametrize("on", [True, False], ids=["expert-blocks", "off"])
@pytest.mark.parametrize("M", [5, 40], ids=["per-pair", "sorted"])
def test_layer_with_expert_blocks(device, monkeypatch, calls, on, M):
    monkeypatch.setattr(eb, "EXPERT_BLOCKS", on)
    h = Harness(E=4, top_k=2, H=32, I=32, backend="triton", device=device, max_loras=3, max_rank=8, seed=11)
    assert isinstance(h.punica, punica_gpu.PunicaWrapperGPU)
    h.load(0, h.new_adapter(rank=8, fused=True))
    h.load(2, h.new_adapter(rank=8, fused=False))
    x, logits = h.inputs(M)
    slots = [(i % 4) - 1 for i in range(M)]
    got = h.forward(x, logits, slots).cpu()
    assert_close(got, h.reference(x, logits, slots), F32)
    sorted_path = M == 40
    assert calls["expert_blocks"] == (2 if on and sorted_path else 0), calls  # w13 and w2
    assert calls["lora_align"] == (1 if sorted_path and not on else 0), calls
