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
