"""Logprobs in the sampler (vs a float64 log_softmax reference), and their bookkeeping on
sequences, in the scheduler, the detokenizer and RequestOutput."""
import pytest
import torch

import vllm.model_executor.layers.sampler as sampler_mod
from vllm.core.block_manager import BlockManager
from vllm.core.scheduler import Scheduler
from vllm.config.scheduler import SchedulerConfig
from vllm.model_executor.layers.sampler import Sampler, SamplerOutput, compute_logprobs
from vllm.outputs import RequestOutput
from vllm.sampling_params import MAX_LOGPROBS, SamplingParams
from vllm.sequence import Logprob, Sequence
from vllm.transformers_utils.detokenizer import Detokenizer

V = 50


def random_logits(rows, seed=3, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 4


def check_entry(entry, token, k, ref_row):
    """``entry`` = {token: Logprob} of ``token`` and the top ``k`` of ``ref_row`` (float64 log-softmax)."""
    top = ref_row.topk(k).indices.tolist()
    assert list(entry) == [token] + [t for t in top if t != token]  # chosen first, then the top-k in rank order
    for t, lp in entry.items():
        assert lp.logprob == pytest.approx(float(ref_row[t]), abs=1e-5), t
        assert lp.decoded_token is None
    assert entry[token].rank == int((ref_row >= ref_row[token]).sum())
    for r, t in enumerate(top):
        if t != token:
            assert entry[t].rank == r + 1


def test_compute_logprobs_matches_float64_reference():
    logits = random_logits(7)
    ref = torch.log_softmax(logits.double(), dim=-1)
    tokens = torch.tensor([0, 5, 17, 49, 3, 3, 20])
    lp = compute_logprobs(logits, tokens, 6)
    assert torch.equal(lp.top_ids, ref.topk(6).indices)  # exact ids, most likely first
    assert torch.allclose(lp.top_logprobs.double(), ref.topk(6).values, atol=1e-5)
    assert torch.allclose(lp.token_logprobs.double(), ref.gather(1, tokens[:, None])[:, 0], atol=1e-5)
    assert lp.token_ranks.tolist() == [int((ref[i] >= ref[i, t]).sum()) for i, t in enumerate(tokens.tolist())]
    # bf16 logits are scored in float32
    assert compute_logprobs(logits.bfloat16(), tokens, 2).top_logprobs.dtype == torch.float32
    # k is capped at the vocabulary
    small = compute_logprobs(random_logits(2, vocab=4), torch.tensor([0, 1]), MAX_LOGPROBS)
    assert small.top_ids.shape == (2, 4)
    with pytest.raises(ValueError, match="token_ids"):
        compute_logprobs(logits, tokens[:3], 2)


def test_sampler_logprobs_are_the_raw_distribution():
    """Greedy, seeded and unseeded rows with and without logprobs; temperature, top-k/top-p and
    min_tokens suppression change what is sampled, never the logprobs (raw log-softmax)."""
    logits = random_logits(6)
    ref = torch.log_softmax(logits.double(), dim=-1)
    params = [SamplingParams(temperature=0, logprobs=3),
              SamplingParams(temperature=0.7, seed=11, top_k=5, logprobs=5),
              SamplingParams(temperature=1.0),                              # no logprobs
              SamplingParams(temperature=1.3, top_p=0.8, logprobs=0),
              SamplingParams(temperature=0, logprobs=MAX_LOGPROBS),
              SamplingParams(temperature=0.5, seed=4, logprobs=2)]
    seqs = [Sequence(i, f"r{i}", [1], p) for i, p in enumerate(params)]
    suppress = [None, None, None, None, [int(logits[4].argmax())], None]  # row 4 may not take its argmax
    before = logits.clone()
    out = Sampler()(logits, params, [s.get_generator() for s in seqs], suppress,
                    num_logprobs=[p.logprobs for p in params])
    assert isinstance(out, SamplerOutput) and torch.equal(logits, before)
    tokens = out.token_ids.tolist()
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[4] == int(logits[4].topk(2).indices[1])  # greedy after suppression
    assert out.logprobs[2] is None
    for i, p in enumerate(params):
        if p.logprobs is not None:
            check_entry(out.logprobs[i], tokens[i], p.logprobs, ref[i])
    assert out.logprobs[0][tokens[0]].rank == 1
    assert out.logprobs[4][tokens[4]].rank == 2  # the suppressed argmax still ranks first in the raw distribution
    assert len(out.logprobs[3]) == 1              # logprobs=0: the sampled token only


def test_logprobs_do_not_change_the_sampled_tokens():
    logits = random_logits(4, seed=9)
    params = [SamplingParams(temperature=0.9, seed=21, logprobs=4), SamplingParams(temperature=0, logprobs=1),
              SamplingParams(temperature=1.1, seed=5), SamplingParams(temperature=0.8, seed=8, logprobs=2)]
    runs = []
    for with_logprobs in (False, True, False):
        seqs = [Sequence(i, f"r{i}", [1], p) for i, p in enumerate(params)]  # fresh generators
        toks = []
        for _ in range(6):
            kw = dict(num_logprobs=[p.logprobs for p in params]) if with_logprobs else {}
            res = Sampler()(logits, params, [s.get_generator() for s in seqs], **kw)
            toks.append((res.token_ids if with_logprobs else res).tolist())
        runs.append(toks)
    assert runs[0] == runs[1] == runs[2]


def test_no_logprobs_costs_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("compute_logprobs ran although no row asked for logprobs")

    monkeypatch.setattr(sampler_mod, "compute_logprobs", boom)
    logits = random_logits(3)
    params = [SamplingParams(temperature=0)] * 3
    assert torch.equal(Sampler()(logits, params, [None] * 3), logits.argmax(-1))
    out = Sampler()(logits, params, [None] * 3, num_logprobs=[None] * 3)
    assert out.logprobs == [None] * 3 and torch.equal(out.token_ids, logits.argmax(-1))
    with pytest.raises(ValueError, match="num_logprobs has 2 entries for 3 rows"):
        Sampler()(logits, params, [None] * 3, num_logprobs=[None] * 2)


def test_rank_counts_ties_against_the_chosen_token():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=0)], [None], num_logprobs=[0])
    token = int(out.token_ids[0])
    assert out.logprobs[0][token].rank == 3


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 1.5, True])
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an integer in \[0, {MAX_LOGPROBS}\]"):
        SamplingParams(**{field: value})
    assert getattr(SamplingParams(**{field: MAX_LOGPROBS}), field) == MAX_LOGPROBS


def test_scheduler_records_logprobs_and_outputs_expose_them():
    params = SamplingParams(n=2, max_tokens=2, logprobs=1, prompt_logprobs=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32),
                      BlockManager(16, 4))
    seqs = [Sequence(i, "req", [5, 6, 7], params, index=i, prompt="abc") for i in range(2)]
    sched.add_seqs(seqs)
    out = sched.schedule()
    prompt_lp = [None, {6: Logprob(-1.0, 2), 9: Logprob(-0.5, 1)}, {7: Logprob(-0.25, 1)}]
    step1 = [{8: Logprob(-0.5, 1)}, {9: Logprob(-2.0, 3), 8: Logprob(-0.5, 1)}]
    sched.postprocess(out.scheduled_seqs, [8, 9], step1, [prompt_lp, prompt_lp])
    out = sched.schedule()
    sched.postprocess(out.scheduled_seqs, [8, 8], [{8: Logprob(-0.125, 1)}, {8: Logprob(-1.5, 2)}], None)
    assert all(s.is_finished for s in seqs)
    detok = Detokenizer(_CharTokenizer())
    for s in seqs:
        detok.decode_sequence_inplace(s)
    ro = RequestOutput.from_seqs(seqs)
    assert ro.prompt_logprobs[0] is None and ro.prompt_logprobs[1][9].decoded_token == "<9>"
    a, b = ro.outputs
    assert a.cumulative_logprob == -0.625 and b.cumulative_logprob == -3.5
    assert [list(e) for e in b.logprobs] == [[9, 8], [8]] and b.logprobs[0][8].decoded_token == "<8>"
    assert "prompt_logprobs=[None" in repr(ro)
    with pytest.raises(ValueError, match="2 logprobs entries for 1 sequences"):
        sched.postprocess(seqs[:1], [3], [None, None])
    # without logprobs nothing is recorded and the outputs say None
    plain = Sequence(9, "p", [1], SamplingParams())
    plain.append_token_id(4)
    ro = RequestOutput.from_seqs([plain])
    assert ro.outputs[0].logprobs is None and ro.outputs[0].cumulative_logprob is None and ro.prompt_logprobs is None
    with pytest.raises(ValueError, match="do not contain it"):
        plain.append_token_id(5, {6: Logprob(-1.0)})


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(f"<{i}>" for i in ids)
