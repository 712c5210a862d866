"""Logprobs and prompt logprobs through LLM.generate on a tiny random checkpoint, against
transformers' log_softmax of its logits at every position."""
import math

import pytest
import torch

from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.utils import assert_close
from vllm import LLM, SamplingParams

PROMPTS = ["hello world", "abc", "the quick brown fox", "x"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, hf, tok = tiny_model_dir("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    llm = LLM(path, max_model_len=128, block_size=4, num_gpu_blocks_override=256)
    return llm, hf, tok


def hf_logprobs(hf, ids):
    """[len(ids) - 1, V] float64: row p is the distribution of the token at position p + 1."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def check_position(entry, token, k, ref_row, tok):
    """entry holds ``token`` then the top-k of ``ref_row`` in order, with transformers' values."""
    top = ref_row.topk(k).indices.tolist()
    assert list(entry) == [token] + [t for t in top if t != token]
    ours = torch.tensor([entry[t].logprob for t in entry], dtype=torch.float64)
    assert_close(ours, ref_row[list(entry)], torch.float32, name="logprobs")
    assert entry[token].rank == int((ref_row >= ref_row[token]).sum())
    assert all(lp.decoded_token == tok.decode([t]) for t, lp in entry.items())


def test_greedy_logprobs_match_transformers(model):
    llm, hf, tok = model
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
        c = out.outputs[0]
        prompt_ids = out.prompt_token_ids
        ref = hf_logprobs(hf, prompt_ids + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 10
        for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            row = ref[len(prompt_ids) - 1 + t]
            check_position(entry, token, 5, row, tok)
            assert entry[token].rank == 1 and token == int(row.argmax())
        assert c.cumulative_logprob == sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs))
        want = sum(float(ref[len(prompt_ids) - 1 + t, token]) for t, token in enumerate(c.token_ids))
        assert math.isclose(c.cumulative_logprob, want, rel_tol=1e-4, abs_tol=1e-4)
        # prompt: the first token has no context; token j is scored by the logits at j - 1
        assert len(out.prompt_logprobs) == len(prompt_ids) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt_ids)):
            check_position(out.prompt_logprobs[j], prompt_ids[j], 3, ref[j - 1], tok)


def test_sampled_logprobs_are_raw_and_sampling_is_unchanged(model):
    """With temperature and top-k the logprobs are still the model's raw distribution, and asking
    for them does not change the seeded tokens."""
    llm, hf, tok = model
    base = dict(temperature=0.7, top_k=8, seed=123, max_tokens=12, ignore_eos=True)
    plain = llm.generate("abc", SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
    out = llm.generate("abc", SamplingParams(**base, logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == plain.token_ids and out.prompt_logprobs is None
    ref = hf_logprobs(hf, out.prompt_token_ids + c.token_ids)
    for t, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        check_position(entry, token, 2, ref[len(out.prompt_token_ids) - 1 + t], tok)
    assert any(e[t].rank > 1 for t, e in zip(c.token_ids, c.logprobs))  # not always the argmax


def test_mixed_batch_n_and_prompt_of_one_token(model):
    llm, hf, tok = model
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=6, ignore_eos=True, logprobs=0,
                             prompt_logprobs=0),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)]
    outs = llm.generate(["hello", "abc", "x"], params, use_tqdm=False)
    assert outs[0].prompt_logprobs is None and outs[0].outputs[0].logprobs is None
    assert len(outs[1].outputs) == 3
    ref_prompt = hf_logprobs(hf, outs[1].prompt_token_ids)
    for j, entry in enumerate(outs[1].prompt_logprobs[1:], start=1):
        check_position(entry, outs[1].prompt_token_ids[j], 0, ref_prompt[j - 1], tok)
    for c in outs[1].outputs:
        assert len(c.logprobs) == len(c.token_ids) and all(len(e) == 1 for e in c.logprobs)
        ref = hf_logprobs(hf, outs[1].prompt_token_ids + c.token_ids)
        got = torch.tensor([e[t].logprob for t, e in zip(c.token_ids, c.logprobs)], dtype=torch.float64)
        n = len(outs[1].prompt_token_ids)
        assert_close(got, ref[n - 1:].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], torch.float32)
    # a one-token prompt has a single (None) prompt entry; output logprobs stay off
    assert outs[2].prompt_logprobs == [None] and outs[2].outputs[0].logprobs is None


def test_preemption_keeps_one_entry_per_token(tmp_path):
    path, hf, tok = tiny_model_dir("qwen3_moe", tmp_path)
    # 12 blocks of 4 tokens cannot hold four ~30-token sequences: some are preempted and recomputed
    llm = LLM(path, max_model_len=64, block_size=4, num_gpu_blocks_override=12, max_num_seqs=4,
              max_num_batched_tokens=64)
    sched = llm.llm_engine.scheduler
    preempted = []
    preempt = sched._preempt
    sched._preempt = lambda seq: (preempted.append(seq.request_id), preempt(seq))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert preempted
    for out in outs:
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids) == 20
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
        ref = hf_logprobs(hf, out.prompt_token_ids + c.token_ids)
        n = len(out.prompt_token_ids)
        got = torch.tensor([e[t].logprob for t, e in zip(c.token_ids, c.logprobs)], dtype=torch.float64)
        assert_close(got, ref[n - 1:].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], torch.float32)
