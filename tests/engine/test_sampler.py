"""Sampler: greedy, top-k / top-p limits, seeded reproducibility, distribution."""
import pytest
import torch

from vllm.model_executor.layers.sampler import Sampler, apply_top_k_top_p
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence

V = 32


def logits_batch(rows=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def test_greedy_is_argmax_and_input_untouched():
    logits = logits_batch()
    before = logits.clone()
    params = [SamplingParams(temperature=0.0)] * logits.shape[0]
    out = Sampler()(logits, params, [None] * logits.shape[0])
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(-1))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_greedy_on_16_bit_logits_is_the_float32_argmax(dtype, monkeypatch):
    """All-greedy rows with nothing to apply take the argmax of the logits in their own dtype (no float32 copy):
    the same index as the float32 argmax, ties (first index), -inf and rows of equal values included; with a
    constraint on any row the float32 path runs and applies it."""
    logits = (logits_batch(rows=7) * 40).to(dtype)
    logits[1, 3] = logits[1, 9] = logits[1].max() + 1  # a tie: the first index wins
    logits[2] = 0.5
    logits[3, :] = float("-inf")
    logits[3, 5] = -1.0
    n = logits.shape[0]
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append(a) or real_to(t, *a, **k))
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * n, [None] * n)
    assert not copies  # no float32 copy of the logits
    assert torch.equal(out, logits.float().argmax(-1)) and out[1] == 3 and out[2] == 0 and out[3] == 5
    want = int(logits[0].float().argmax())
    suppressed = [[want]] + [None] * (n - 1)
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * n, [None] * n, suppressed)
    assert copies and out[0] != want and torch.equal(out[1:], logits[1:].float().argmax(-1))
    logits[0, 7] = logits[0].max() - 50  # the bias (at most 100) lifts it to the top
    biased = [SamplingParams(temperature=0.0, logit_bias={7: 100})] + [SamplingParams(temperature=0.0)] * (n - 1)
    assert Sampler()(logits, biased, [None] * n)[0] == 7


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = logits_batch(rows=8)
    n = logits.shape[0]
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0.7, top_k=3, top_p=1e-4)):
        for _ in range(5):
            assert torch.equal(Sampler()(logits, [p] * n, [None] * n), logits.argmax(-1))


def test_top_k_top_p_masks_exactly():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    out = apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    keep = torch.isfinite(out)
    # row 0: top-2 -> {0, 1}; row 1: mass before 0.5, 0.3 is 0, 0.5 <= 0.7; before 0.15 it is 0.8 > 0.7
    assert keep.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert torch.equal(out[keep], logits[keep])


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = logits_batch(rows=4)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=3)]
    seq = Sequence(0, "s", [1], params[3])
    out = Sampler()(logits, params, [None, None, None, seq.get_generator("cpu")])
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def _seeded_tokens(logits_row, others, steps=8, position=0):
    """Tokens of one seeded sequence sampled among ``others`` unseeded rows."""
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    seq = Sequence(0, "r", [1], params)
    noise = [SamplingParams(temperature=1.3, top_k=i % 5) for i in range(others)]
    tokens = []
    for step in range(steps):
        batch = list(logits_batch(rows=others, seed=100 + step)) if others else []
        batch.insert(position, logits_row)
        ps = list(noise)
        ps.insert(position, params)
        gens = [None] * others
        gens.insert(position, seq.get_generator("cpu"))
        tokens.append(int(Sampler()(torch.stack(batch), ps, gens)[position]))
    return tokens


def test_seeded_sampling_reproducible_and_batch_independent():
    row = torch.zeros(V)  # uniform: many possible tokens, so equality is meaningful
    alone = _seeded_tokens(row, others=0)
    assert alone == _seeded_tokens(row, others=0)
    assert alone == _seeded_tokens(row, others=5, position=2)
    assert alone == _seeded_tokens(row, others=3, position=3)
    assert len(set(alone)) > 1


def test_different_samples_of_a_seeded_request_differ():
    p = SamplingParams(temperature=1.0, seed=7, n=2)
    s0, s1 = Sequence(0, "r", [1], p, index=0), Sequence(1, "r", [1], p, index=1)
    row = torch.zeros(1, V)
    t0 = [int(Sampler()(row, [p], [s0.get_generator()])[0]) for _ in range(10)]
    t1 = [int(Sampler()(row, [p], [s1.get_generator()])[0]) for _ in range(10)]
    assert t0 != t1


def test_distribution_matches_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 40000
    logits = torch.log(probs).expand(n, 4).contiguous()
    out = Sampler()(logits, [SamplingParams(temperature=1.0)] * n, [None] * n)
    freq = torch.bincount(out, minlength=4).double() / n
    # 4 sigma of a binomial proportion at n=40000 is < 0.01
    assert torch.allclose(freq, probs.double(), atol=0.01), freq


def test_temperature_sharpens_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    logits = torch.log(probs).expand(n, 4).contiguous()
    out = Sampler()(logits, [SamplingParams(temperature=0.5)] * n, [None] * n)
    expected = probs ** 2 / (probs ** 2).sum()
    freq = torch.bincount(out, minlength=4).double() / n
    assert torch.allclose(freq, expected.double(), atol=0.015), freq


def test_suppressed_tokens_never_sampled():
    logits = torch.zeros(2, 4)
    logits[:, 3] = 10.0
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)]
    for _ in range(20):
        out = Sampler()(logits, params, [None, None], suppress_token_ids=[[3], [3, 2]])
        assert out[0] != 3 and out[1] in (0, 1)


def test_errors_are_clear():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="as many SamplingParams"):
        Sampler()(logits, [SamplingParams()], [None])
    with pytest.raises(ValueError, match="no generator"):
        Sampler()(logits, [SamplingParams(seed=1)] * 2, [None, None])
    with pytest.raises(ValueError, match=r"\[num_seqs, vocab_size\]"):
        Sampler()(torch.zeros(4), [], [])
    assert Sampler()(torch.zeros(0, 4), [], []).shape == (0,)


@pytest.mark.cuda
def test_seeded_sampling_on_cuda():
    p = SamplingParams(temperature=1.0, seed=5)
    row = torch.zeros(1, V, device="cuda")
    runs = []
    for _ in range(2):
        seq = Sequence(0, "r", [1], p)
        runs.append([int(Sampler()(row, [p], [seq.get_generator(row.device)])[0]) for _ in range(5)])
    assert runs[0] == runs[1]
