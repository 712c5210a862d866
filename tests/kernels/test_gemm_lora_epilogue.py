"""The grouped GEMM with a LoRA expand in its epilogue (``gemm_lora_epilogue.py``): GEMM2-style
launches (rows = pairs) against the fp32 GEMM reference plus a float64 delta; rows without an adapter slot bit
for bit the launch without the epilogue; bad arguments named."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_moe_align_block_size import make_topk_ids
from tests.utils import assert_close, poison_
from vllm.kernel_configs.tile_config import TileConfig
from vllm.model_executor.layers.fused_moe.ops.fused_moe_gemm import fused_moe_gemm_reference, invoke_fused_moe_gemm
from vllm.model_executor.layers.fused_moe.ops.gemm_lora_epilogue import (GemmLoRAEpilogue,
                                                                          gemm_lora_epilogue_reference)
from vllm.model_executor.layers.fused_moe.ops.moe_align_block_size import moe_align_block_size


def _problem(M, E, top_k, N, K, R, L, dtype, device, *, slots_used):
    ids = make_topk_ids(M, E, top_k, empty_expert=False).to(device)
    ids[-1, 0] = E - 1  # the last expert is routed
    a = torch.randn(M * top_k, K, device=device).to(dtype)
    w = (torch.randn(E, N, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(L, E, N, R, device=device) / R**0.5).to(dtype)
    shrunk = torch.randn(M * top_k, R, device=device, dtype=torch.float32)
    slots = torch.tensor([slots_used[t % len(slots_used)] for t in range(M)], dtype=torch.int32, device=device)
    weights = torch.rand(M, top_k, device=device) * 0.9 + 0.1
    return ids, a, w, b, shrunk, slots, weights


def _launch(a, w, ids, weights, *, weighted, bias, lora, bm=16):
    al = moe_align_block_size(ids, bm, w.shape[0])
    out = poison_(torch.empty(a.shape[0], w.shape[1], dtype=a.dtype, device=a.device))
    invoke_fused_moe_gemm(a, w, out, sorted_token_ids=al.sorted_token_ids, block_expert_ids=al.block_expert_ids,
                          num_tokens_post_padded=al.num_tokens_post_padded, top_k_in=1, topk_weights=weights,
                          mul_routed_weight=weighted, bias=bias, config=TileConfig(bm, 32, 32), lora=lora)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted,use_bias", [(True, False), (False, True)])
def test_epilogue_matches_reference(dtype, weighted, use_bias, device):
    M, E, top_k, N, K, R, L = 21, 6, 2, 48, 40, 8, 3
    ids, a, w, b, shrunk, slots, weights = _problem(M, E, top_k, N, K, R, L, dtype, device, slots_used=[0, 2, -1, 1])
    bias = torch.randn(E, N, device=device).to(dtype) if use_bias else None
    lora = GemmLoRAEpilogue(shrunk=shrunk, lora_b=b, token_slots=slots, top_k=top_k)
    out = _launch(a, w, ids, weights, weighted=weighted, bias=bias, lora=lora)
    ref = fused_moe_gemm_reference(a, w, ids, top_k_in=1, bias=bias).double()
    ref += gemm_lora_epilogue_reference(shrunk, b, slots, ids)
    if weighted:
        ref *= weights.reshape(-1, 1).double()
    routed = ids.reshape(-1) >= 0
    bounds = dict(dtype=torch.float16) if dtype == torch.float32 and device.type == "cuda" else dict(dtype=dtype)
    assert_close(out[routed].float(), ref[routed].float(), **bounds)
    assert out[~routed].isnan().all(), "rows of dropped pairs must not be written"
    # the delta is not negligible: the comparison above could fail
    assert gemm_lora_epilogue_reference(shrunk, b, slots, ids)[routed].abs().max() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_a_slot_are_the_plain_gemm_bit_for_bit(dtype, device):
    M, E, top_k, N, K, R, L = 19, 5, 2, 48, 40, 16, 2
    ids, a, w, b, shrunk, slots, weights = _problem(M, E, top_k, N, K, R, L, dtype, device, slots_used=[-1, 1])
    lora = GemmLoRAEpilogue(shrunk=shrunk, lora_b=b, token_slots=slots, top_k=top_k)
    plain = _launch(a, w, ids, weights, weighted=True, bias=None, lora=None)
    fused = _launch(a, w, ids, weights, weighted=True, bias=None, lora=lora)
    no_slot = (slots.long().repeat_interleave(top_k) < 0) & (ids.reshape(-1) >= 0)
    with_slot = (slots.long().repeat_interleave(top_k) >= 0) & (ids.reshape(-1) >= 0)
    assert no_slot.any() and with_slot.any()
    assert torch.equal(fused[no_slot], plain[no_slot])
    assert not torch.equal(fused[with_slot], plain[with_slot])


def test_bad_epilogue_arguments_are_named(device):
    M, E, top_k, N, K, R, L = 4, 3, 2, 32, 32, 8, 2
    ids, a, w, b, shrunk, slots, weights = _problem(M, E, top_k, N, K, R, L, torch.float32, device,
                                                    slots_used=[0, 1])
    cases = [(dict(shrunk=shrunk.half()), "shrunk must be fp32"),
             (dict(lora_b=b[:, :, :16]), "lora_b must be"),
             (dict(token_slots=slots.long()), "token_slots must be int32"),
             (dict(top_k=3), "top_k=3 does not divide")]
    for over, match in cases:
        lora = GemmLoRAEpilogue(**{**dict(shrunk=shrunk, lora_b=b, token_slots=slots, top_k=top_k), **over})
        with pytest.raises(ValueError, match=match):
            _launch(a, w, ids, weights, weighted=False, bias=None, lora=lora)


def test_sm90_epilogue_compiles_without_spills():
    """Compiled for sm_90 at Qwen3-30B-A3B's GEMM1 and GEMM2 (a subprocess without the interpreter:
    gemm_lora_epilogue_compile.py)."""
    from tests.utils import run_without_interpreter

    assert run_without_interpreter("tests/kernels/gemm_lora_epilogue_compile.py").count("ok ") == 6
