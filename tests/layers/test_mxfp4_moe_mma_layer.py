"""UnfusedOAITritonExperts on MXFP4 weights repacked at load (``VLLM_MXFP4_MMA=1``, the default on CUDA): decode
launches on the tensor-core kernel (``csrc/capi/mxfp4_mma_moe.cu``), with and without LoRA, in a CUDA graph,
and the dequant path from the repacked words, against the fp32 loop reference on transformers-dequantised
weights (CUDA only: the kernel is CUDA C++)."""
import pytest
import torch

import vllm.model_executor.layers.fused_moe.ops.mxfp4_mma_moe as mma_mod
from tests.layers.moe_setup import pick_slots
from tests.layers.mxfp4_setup import dequantized_weights, make_mxfp4_layer
from tests.layers.test_mxfp4_moe_layer import _case, _ref
from tests.lora.test_mxfp4_moe_lora import Mxfp4Harness
from tests.utils import assert_close

pytestmark = pytest.mark.cuda


@pytest.fixture
def mma_calls(monkeypatch):
    """Turn the kernel on and record its launches (block_m of each)."""
    monkeypatch.setenv("VLLM_MXFP4_MMA", "1")
    calls, invoke = [], mma_mod.invoke_mxfp4_mma_moe_gemm
    monkeypatch.setattr(mma_mod, "invoke_mxfp4_mma_moe_gemm",
                        lambda *a, **kw: calls.append(kw) or invoke(*a, **kw))
    return calls


# blocks of 8, 8, 8, 16 and 64 rows; 1200: ~150 pairs per expert, several 64-row blocks each (up to MMA_MAX_ROWS)
@pytest.mark.parametrize("M", [1, 4, 16, 64, 200, 1200])
def test_mma_layer_matches_reference(M, mma_calls):
    ck, x, logits = _case(M, 32, 4, 256, 128, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 4, torch.bfloat16, "cuda", backend="triton")
    assert hasattr(layer, "w13_mma_words") and layer.w13_blocks.stride() == (0, 0, 0, 0)  # one 4-bit copy
    out = layer(x, logits)
    assert mma_calls, "the tensor-core kernel did not run"
    assert_close(out.float().cpu(), _ref(dequantized_weights(ck), x, logits, 4, "swigluoai"), torch.bfloat16)


def test_dequant_path_from_the_words(mma_calls):
    """Beyond MMA_MAX_ROWS pairs per expert (~300 here) the GEMMs dequantise the repacked words (one Triton launch
    each, ``w4_mma_dequant``) and run the bf16 grouped GEMM: no tensor-core launch, the same layer."""
    ck, x, logits = _case(2400, 32, 4, 256, 128, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 4, torch.bfloat16, "cuda", backend="triton")
    out = layer(x, logits)
    assert not mma_calls
    assert_close(out.float().cpu(), _ref(dequantized_weights(ck), x, logits, 4, "swigluoai"), torch.bfloat16)


def test_words_hold_the_checkpoint_bytes(mma_calls):
    """4.25 bits per weight: the repacked words and transposed scales are as large as the blocks and scales."""
    ck, _, _ = _case(1, 8, 2, 128, 192, "swigluoai", True, True, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 2, torch.bfloat16, "cuda", backend="triton")
    for name, prefix in (("w13", "gate_up_proj"), ("w2", "down_proj")):
        words, scales = getattr(layer, f"{name}_mma_words"), getattr(layer, f"{name}_mma_scales")
        assert words.numel() * 4 == ck[f"{prefix}_blocks"].numel()
        assert torch.equal(scales.cpu(), ck[f"{prefix}_scales"].transpose(1, 2))


@pytest.mark.parametrize("M", [1, 16, 64])
def test_mma_layer_with_lora(M, mma_calls):
    h = Mxfp4Harness(E=16, top_k=4, H=256, I=128, dtype=torch.bfloat16, device="cuda", backend="triton",
                     max_loras=3, max_rank=16, seed=M)
    for slot, r in enumerate((16, 8, 16)):
        h.load(slot, h.new_adapter(rank=r))
    x, logits = h.inputs(M)
    slots = pick_slots(M, 3, "mixed", seed=M)
    out = h.forward(x, logits, slots)
    assert mma_calls, "the tensor-core kernel did not run"
    ref = h.reference(x, logits, slots)
    assert_close(out.float().cpu(), ref, torch.bfloat16)
    base = h.reference(x, logits, [-1] * M)
    assert (ref - base).abs().max() > 10 * (out.float().cpu() - ref).abs().max()


def test_mma_layer_in_a_cuda_graph(mma_calls):
    """A captured forward replayed on new inputs equals an eager forward."""
    ck, x, logits = _case(4, 32, 4, 256, 128, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 4, torch.bfloat16, "cuda", backend="triton")
    out = layer(x, logits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x, logits))


def test_fp16_and_narrow_shapes_stay_on_the_blocks(mma_calls):
    """fp16 activations (the decode writes bf16) and K % 64 != 0 keep the checkpoint's blocks and Triton."""
    ck, x, logits = _case(3, 8, 2, 256, 128, "swigluoai", True, True, torch.float16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 2, torch.float16, "cuda", backend="triton")
    assert not hasattr(layer, "w13_mma_words")
    assert_close(layer(x, logits).float().cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"),
                 torch.float16)
    ck, _, _ = _case(3, 8, 2, 96, 32, "swigluoai", True, True, torch.bfloat16, torch.device("cuda"))
    assert not hasattr(make_mxfp4_layer(ck, 2, torch.bfloat16, "cuda", backend="triton"), "w13_mma_words")
    assert not mma_calls


@pytest.mark.parametrize("M", [1, 3])
def test_split_reductions_fuse_the_activation_and_the_sum(M, mma_calls):
    """Few tokens over K >= 2048 split K: GEMM1's reduction applies swigluoai and GEMM2's sums the top-k rows
    (no activation or moe_sum launch); the layer still matches the reference."""
    ck, x, logits = _case(M, 8, 2, 2048, 2048, "swigluoai", True, False, torch.bfloat16, torch.device("cuda"))
    layer = make_mxfp4_layer(ck, 2, torch.bfloat16, "cuda", backend="triton")
    out = layer(x, logits)
    assert [kw.get("epilogue_activation") is not None for kw in mma_calls] == [True, False]
    assert [kw.get("epilogue_top_k", 0) for kw in mma_calls] == [0, 2]
    assert_close(out.float().cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.bfloat16)


@pytest.mark.parametrize("M,H,I", [(16, 256, 128), (2, 2048, 2048)])  # the second splits K: fused epilogues
def test_expert_parallel_ranks_sum_to_the_layer(M, H, I, mma_calls):
    """EP: pairs routed to the other rank's experts are dropped (split partials zeroed first); the two ranks'
    outputs add up to the full layer."""
    ck, x, logits = _case(M, 8, 2, H, I, "swigluoai", True, True, torch.bfloat16, torch.device("cuda"))
    ranks = [make_mxfp4_layer(ck, 2, torch.bfloat16, "cuda", backend="triton", ep_size=2, ep_rank=r)
             for r in range(2)]
    assert all(hasattr(layer, "w13_mma_words") for layer in ranks)
    total = sum(layer(x, logits).float() for layer in ranks)
    assert mma_calls
    assert_close(total.cpu(), _ref(dequantized_weights(ck), x, logits, 2, "swigluoai"), torch.bfloat16)
