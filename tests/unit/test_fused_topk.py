"""Routing against a float64 per-token loop."""
import pytest
import torch

from vllm.model_executor.layers.fused_moe.router import fused_topk, fused_topk_reference


@pytest.mark.parametrize("M,E,k", [(0, 4, 2), (1, 8, 1), (7, 16, 8), (33, 64, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(M, E, k, renormalize):
    logits = torch.randn(M, E)
    w, ids = fused_topk(logits, k, renormalize=renormalize)
    rw, rids = fused_topk_reference(logits, k, renormalize=renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)


def test_topk_then_softmax_equals_renormalised_softmax():
    logits = torch.randn(9, 32)
    w, ids = fused_topk(logits, 4, renormalize=False, topk_then_softmax=True)
    rw, rids = fused_topk_reference(logits, 4, renormalize=False, topk_then_softmax=True)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)
    w2, _ = fused_topk(logits, 4, renormalize=True)
    torch.testing.assert_close(w, w2, rtol=1e-5, atol=1e-6)


def test_router_bias_and_correction_bias():
    logits = torch.randn(5, 8)
    bias = torch.randn(8)
    w, ids = fused_topk(logits, 2, renormalize=True, router_bias=bias)
    rw, rids = fused_topk_reference(logits + bias, 2, renormalize=True)
    assert torch.equal(ids, rids)
    # a correction bias changes which experts are picked but not how they are weighted
    corr = torch.zeros(8)
    corr[3] = 100.0
    w, ids = fused_topk(logits, 2, renormalize=False, scoring_func="sigmoid", correction_bias=corr)
    assert (ids == 3).any(dim=1).all()
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids.long()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        fused_topk(torch.randn(2, 4), 5, renormalize=True)
    with pytest.raises(ValueError, match="scoring_func"):
        fused_topk(torch.randn(2, 4), 2, renormalize=True, scoring_func="relu")


# ---- the fused Triton router (interpreter on CPU) --------------------------------------------------
@pytest.mark.parametrize("M,E,k", [(1, 8, 1), (7, 60, 4), (5, 128, 8), (3, 6, 6)])  # 60, 6: not powers of two
@pytest.mark.parametrize("renormalize,topk_then_softmax", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_router_matches_reference(M, E, k, renormalize, topk_then_softmax, dtype, device):
    logits = (torch.randn(M, E) * 2).to(dtype)
    w, ids = fused_topk(logits.to(device), k, renormalize=renormalize, topk_then_softmax=topk_then_softmax,
                        use_triton=True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and w.shape == ids.shape == (M, k)
    rw, rids = fused_topk_reference(logits.float(), k, renormalize=renormalize, topk_then_softmax=topk_then_softmax)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu().double(), rw, rtol=1e-5, atol=1e-6)


def test_triton_router_bias_ties_and_empty(device):
    logits = torch.randn(4, 16)
    bias = torch.randn(16)
    w, ids = fused_topk(logits.to(device), 3, renormalize=True, router_bias=bias.to(device), use_triton=True)
    rw, rids = fused_topk_reference(logits + bias, 3, renormalize=True)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu().double(), rw, rtol=1e-5, atol=1e-6)
    # equal scores: the lowest expert ids first, as the reference's stable order
    w, ids = fused_topk(torch.zeros(2, 8, device=device), 3, renormalize=False, use_triton=True)
    assert ids.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(w.cpu(), torch.full((2, 3), 1 / 8))
    w, ids = fused_topk(torch.zeros(0, 8, device=device), 2, renormalize=True, use_triton=True)
    assert w.shape == ids.shape == (0, 2)


def test_triton_router_strided_logits(device):
    """Router logits as a column slice (e.g. of a fused projection) are read through their stride."""
    base = torch.randn(5, 40, device=device)
    w, ids = fused_topk(base[:, 4:36], 2, renormalize=True, use_triton=True)
    rw, rids = fused_topk_reference(base[:, 4:36].cpu(), 2, renormalize=True)
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu().double(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_router_qwen3_width():
    """128 experts top-8 at 1..512 tokens (bf16 logits, as the router's linear makes them)."""
    for M in (1, 64, 512):
        logits = torch.randn(M, 128, device="cuda").to(torch.bfloat16)
        w, ids = fused_topk(logits, 8, renormalize=True)
        rw, rids = fused_topk_reference(logits.float().cpu(), 8, renormalize=True)
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu().double(), rw, rtol=1e-5, atol=1e-6)
