"""The dense layers the models are made of: TP slicing of the linear layers and
the vocabulary, RoPE and RMSNorm against transformers, logits in float32."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, apply_rotary_pos_emb

from tests.utils import assert_close
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                               ReplicatedLinear, RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

ATTRS = ("input_size", "output_size", "input_size_per_partition", "output_size_per_partition", "tp_size", "tp_rank",
         "weight", "bias", "prefix")


def _load(layer, tensors: dict, shard_ids=(None,)):
    for sid in shard_ids:
        layer.weight.weight_loader(layer.weight, tensors[sid][0], sid)
        if layer.bias is not None:
            layer.bias.weight_loader(layer.bias, tensors[sid][1], sid)


def test_replicated_and_column_parallel():
    x, W, b = torch.randn(5, 12), torch.randn(8, 12), torch.randn(8)
    rep = ReplicatedLinear(12, 8, bias=True, prefix="r")
    _load(rep, {None: (W, b)})
    assert_close(rep(x), x @ W.T + b, torch.float32)
    outs = []
    for rank in range(2):
        col = ColumnParallelLinear(12, 8, bias=True, tp_size=2, tp_rank=rank, prefix="c")
        assert all(hasattr(col, a) for a in ATTRS)
        assert (col.output_size, col.output_size_per_partition, col.input_size_per_partition) == (8, 4, 12)
        _load(col, {None: (W, b)})
        outs.append(col(x))
    assert_close(torch.cat(outs, -1), x @ W.T + b, torch.float32)
    with pytest.raises(ValueError, match="divisible"):
        ColumnParallelLinear(12, 7, tp_size=2)


def test_merged_column_parallel_shards_each_output():
    x, G, U = torch.randn(3, 6), torch.randn(8, 6), torch.randn(8, 6)
    full = MergedColumnParallelLinear(6, [8, 8])
    full.weight_loader(full.weight, torch.cat([G, U]))  # the whole fused tensor at once
    assert torch.equal(full.weight, torch.cat([G, U]))
    gate_parts, up_parts = [], []
    for rank in range(2):
        m = MergedColumnParallelLinear(6, [8, 8], tp_size=2, tp_rank=rank)
        assert m.output_sizes == [8, 8] and m.output_partition_sizes == [4, 4]
        _load(m, {0: (G, None), 1: (U, None)}, shard_ids=(1, 0))
        g, u = m(x).split(4, -1)
        gate_parts.append(g)
        up_parts.append(u)
    assert_close(torch.cat(gate_parts, -1), x @ G.T, torch.float32)
    assert_close(torch.cat(up_parts, -1), x @ U.T, torch.float32)
    with pytest.raises(ValueError, match="shard id"):
        m.weight_loader(m.weight, G, 2)


@pytest.mark.parametrize("tp_size", [1, 2, 4])  # 4 ranks > 2 KV heads: each KV head on two ranks
def test_qkv_parallel_by_heads(tp_size):
    H, D, nh, nkv = 16, 4, 4, 2
    x = torch.randn(3, H)
    Q, K, V = torch.randn(nh * D, H), torch.randn(nkv * D, H), torch.randn(nkv * D, H)
    bq, bk, bv = torch.randn(nh * D), torch.randn(nkv * D), torch.randn(nkv * D)
    for rank in range(tp_size):
        layer = QKVParallelLinear(H, D, nh, nkv, bias=True, tp_size=tp_size, tp_rank=rank)
        assert layer.output_sizes == [nh * D, nkv * D, nkv * D] and layer.output_size == (nh + 2 * nkv) * D
        assert layer.num_heads == nh // tp_size and layer.num_kv_heads == max(1, nkv // tp_size)
        _load(layer, {"q": (Q, bq), "k": (K, bk), "v": (V, bv)}, shard_ids=("v", "q", "k"))
        q, k, v = layer(x).split(layer.output_partition_sizes, -1)
        kv_head = rank * nkv // tp_size
        qs = slice(rank * layer.num_heads * D, (rank + 1) * layer.num_heads * D)
        ks = slice(kv_head * D, kv_head * D + layer.num_kv_heads * D)
        assert_close(q, x @ Q[qs].T + bq[qs], torch.float32)
        assert_close(k, x @ K[ks].T + bk[ks], torch.float32)
        assert_close(v, x @ V[ks].T + bv[ks], torch.float32)


def test_row_parallel_partial_sums():
    x, W, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    total = 0
    for rank in range(2):
        row = RowParallelLinear(8, 5, bias=True, reduce_results=False, tp_size=2, tp_rank=rank)
        assert (row.input_size_per_partition, row.output_size_per_partition) == (4, 5)
        _load(row, {None: (W, b)})
        total = total + row(x[:, rank * 4:(rank + 1) * 4])  # bias added on rank 0 only
    assert_close(total, x @ W.T + b, torch.float32)
    with pytest.raises(ValueError, match="tp_group"):
        RowParallelLinear(8, 5, tp_size=2, tp_rank=0)


class _Sum:
    """A stand-in TP group over partial results computed by every rank's layer in this process."""

    def __init__(self, fn):
        self.fn = fn

    def all_reduce(self, t):
        return self.fn()

    def all_gather(self, t, dim):
        return self.fn()


def test_vocab_parallel_embedding_and_lm_head():
    V, H, tp = 10, 6, 3  # 4 rows per rank, the last rank holds 2 real rows and 2 padding rows
    table, ids, hidden = torch.randn(V, H), torch.tensor([0, 3, 4, 9, 7]), torch.randn(2, H)
    embs, heads = [], []
    group = _Sum(lambda: sum(F.embedding(torch.where((ids >= e.vocab_start_index) & (ids < e.vocab_end_index),
                                                     ids - e.vocab_start_index, 0), e.weight)
                             * ((ids >= e.vocab_start_index) & (ids < e.vocab_end_index))[:, None] for e in embs))
    head_group = _Sum(lambda: torch.cat([F.linear(hidden, h.weight) for h in heads], -1))
    for rank in range(tp):
        e = VocabParallelEmbedding(V, H, tp_size=tp, tp_rank=rank, tp_group=group)
        e.weight_loader(e.weight, table)
        embs.append(e)
        h = ParallelLMHead(V, H, tp_size=tp, tp_rank=rank, tp_group=head_group)
        h.weight_loader(h.weight, table)
        heads.append(h)
    assert embs[-1].weight.shape == (4, H) and torch.equal(embs[-1].weight[2:], torch.zeros(2, H))
    assert torch.equal(embs[0](ids), table[ids])
    logits = LogitsProcessor(V)(heads[0], hidden)
    assert logits.shape == (2, V) and logits.dtype == torch.float32
    assert_close(logits, hidden @ table.T, torch.float32)


def test_logits_keep_the_model_dtype_and_heads_tie():
    """Without a scale or soft cap the logits are the projection's own numbers in the model dtype (the sampler and
    logprobs widen them to float32 exactly); with one, float32."""
    emb = VocabParallelEmbedding(12, 8, params_dtype=torch.bfloat16)
    emb.weight_loader(emb.weight, torch.randn(12, 8))
    head = ParallelLMHead(12, 8, params_dtype=torch.bfloat16).tie_weights(emb)
    assert head.weight is emb.weight
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    logits = LogitsProcessor(12)(head, hidden)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, torch.nn.functional.linear(hidden, emb.weight))
    assert_close(logits.float(), (hidden.float() @ emb.weight.float().T), torch.bfloat16)
    scaled = LogitsProcessor(12, scale=0.5)(head, hidden)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, logits.float() * 0.5)
    capped = LogitsProcessor(12, soft_cap=2.0)(head, hidden)
    assert capped.dtype == torch.float32 and torch.equal(capped, torch.tanh(logits.float() / 2.0) * 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_and_fuses_the_residual(dtype):
    ref = Qwen3MoeRMSNorm(16, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16))
    norm = RMSNorm(16, 1e-6, params_dtype=dtype)
    norm.weight_loader(norm.weight, ref.weight.detach())
    x, r = torch.randn(5, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype)
    assert torch.equal(norm(x), ref(x))
    y, new_r = norm(x, r)
    assert torch.equal(new_r, x + r) and torch.equal(y, ref(x + r))


@pytest.mark.parametrize("head_dim, base", [(16, 10000.0), (32, 1e6)])
def test_rope_matches_transformers(head_dim, base):
    T, nh, nkv, max_pos = 7, 4, 2, 64
    positions = torch.tensor([0, 1, 2, 9, 33, 63, 5])
    q, k = torch.randn(T, nh * head_dim), torch.randn(T, nkv * head_dim)
    rope = get_rope(head_dim, max_pos, base)
    got_q, got_k = rope(positions, q, k)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    ref_q, ref_k = apply_rotary_pos_emb(q.view(1, T, nh, head_dim), k.view(1, T, nkv, head_dim),
                                        emb.cos()[None], emb.sin()[None], unsqueeze_dim=2)
    assert_close(got_q, ref_q.reshape(T, -1), torch.float32)
    assert_close(got_k, ref_k.reshape(T, -1), torch.float32)


def test_rope_partial_linear_and_unsupported():
    q, k, pos = torch.randn(3, 2 * 8), torch.randn(3, 8), torch.tensor([0, 4, 10])
    partial = get_rope(8, 32, 10000.0, rotary_dim=4)
    pq, pk = partial(pos, q, k)
    assert torch.equal(pq.view(3, 2, 8)[..., 4:], q.view(3, 2, 8)[..., 4:])  # the tail passes through
    assert_close(pq.view(3, 2, 8)[..., :4], get_rope(4, 32, 10000.0)(pos, q.view(3, 2, 8)[..., :4].reshape(3, 8),
                                                                      k[:, :4])[0].view(3, 2, 4), torch.float32)
    linear = get_rope(8, 32, 10000.0, {"rope_type": "linear", "factor": 2.0})
    assert_close(linear(pos, q, k)[0], get_rope(8, 32, 10000.0)(pos // 2, q, k)[0], torch.float32)
    with pytest.raises(NotImplementedError, match="longrope"):
        get_rope(8, 32, 10000.0, {"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="max_position"):
        partial(torch.tensor([32]), q[:1], k[:1])
