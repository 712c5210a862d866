"""Scheduler: prefill limits, decode, preemption, LoRA limit, ignored prompts, abort, stops."""
from dataclasses import dataclass

import pytest

from vllm.config.scheduler import SchedulerConfig
from vllm.core.block_manager import BlockManager
from vllm.core.scheduler import Scheduler
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceStatus

EOS = 2


@dataclass
class FakeLoRA:
    lora_int_id: int


def make_seq(seq_id, prompt_len, max_tokens=16, lora=None, request_id=None, **params):
    return Sequence(seq_id, request_id or f"r{seq_id}", [10 + (seq_id * 7 + i) % 50 for i in range(prompt_len)],
                    SamplingParams(max_tokens=max_tokens, **params), eos_token_id=EOS,
                    lora_request=FakeLoRA(lora) if lora else None, arrival_time=float(seq_id))


def make_scheduler(num_blocks=64, block_size=4, **cfg):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def fake_token(seq):
    """A deterministic 'model': the next token depends only on the token history and the adapter
    (as a real adapter changes the model: a sequence that lost its adapter continues differently)."""
    return 10 + hash((seq.lora_int_id, tuple(seq.token_ids))) % 50


def run_to_completion(sched, bm, check_kv=True, max_steps=1000):
    """Drive schedule -> fake model -> postprocess; check the KV slots every step."""
    kv = {}  # slot -> (seq_id, position, token)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        steps.append(out)
        if out.is_empty:
            continue
        tokens, positions, slots = out.input_token_ids(), out.positions(), out.slot_mapping(bm.block_size)
        assert len(tokens) == len(positions) == len(slots) == out.num_batched_tokens
        for tok, pos, slot, seq_id in zip(tokens, positions, slots,
                                          [s.seq_id for s, q in zip(out.scheduled_seqs, out.query_lens)
                                           for _ in range(q)]):
            kv[slot] = (seq_id, pos, tok)
        if check_kv:  # every context position of every sequence reads back its own token
            for seq, n in zip(out.scheduled_seqs, out.seq_lens):
                got = [kv[s] for s in bm.slot_mapping(seq, 0, n)]
                assert got == [(seq.seq_id, p, seq.token_ids[p]) for p in range(n)]
        sched.postprocess(out.scheduled_seqs, [fake_token(s) for s in out.scheduled_seqs])
    assert not sched.has_unfinished()
    bm.check_no_leaks()
    return steps


def test_prefill_respects_token_budget():
    sched, _ = make_scheduler(max_num_batched_tokens=20, max_model_len=20, max_num_seqs=8)
    sched.add_seqs([make_seq(i, 8) for i in range(4)])
    out = sched.schedule()
    assert out.is_prefill and [s.seq_id for s in out.scheduled_seqs] == [0, 1]
    assert out.query_lens == [8, 8] and out.context_lens == [0, 0] and out.seq_lens == [8, 8]
    assert len(sched.waiting) == 2 and all(s.status == SequenceStatus.RUNNING for s in out.scheduled_seqs)


def test_prefill_respects_max_num_seqs_including_running():
    sched, _ = make_scheduler(max_num_seqs=3)
    sched.add_seqs([make_seq(i, 3) for i in range(2)])
    assert len(sched.schedule().scheduled_seqs) == 2
    sched.add_seqs([make_seq(i, 3) for i in range(2, 5)])
    out = sched.schedule()
    assert out.is_prefill and [s.seq_id for s in out.scheduled_seqs] == [2]


def test_decode_one_token_per_running_seq_and_runner_inputs():
    sched, bm = make_scheduler(block_size=4)
    a, b = make_seq(0, 4), make_seq(1, 2)
    sched.add_seqs([a, b])
    out = sched.schedule()
    assert out.input_token_ids() == a.prompt_token_ids + b.prompt_token_ids
    assert out.positions() == [0, 1, 2, 3, 0, 1]
    sched.postprocess(out.scheduled_seqs, [11, 12])
    assert a.num_computed_tokens == 4 and a.output_token_ids == [11]
    out = sched.schedule()
    assert not out.is_prefill and out.scheduled_seqs == [a, b]
    assert out.query_lens == [1, 1] and out.context_lens == [4, 2] and out.seq_lens == [5, 3]
    assert out.input_token_ids() == [11, 12] and out.positions() == [4, 2]
    assert len(a.block_table) == 2  # position 4 opened a second block
    assert out.slot_mapping(4) == [a.block_table[1] * 4, b.block_table[0] * 4 + 2]
    assert out.block_tables == [a.block_table, b.block_table]


def test_prefill_comes_before_decode():
    sched, _ = make_scheduler()
    sched.add_seq(make_seq(0, 3))
    out = sched.schedule()
    sched.postprocess(out.scheduled_seqs, [20])
    sched.add_seq(make_seq(1, 3))
    out = sched.schedule()
    assert out.is_prefill and [s.seq_id for s in out.scheduled_seqs] == [1]
    assert not sched.schedule().is_prefill


def test_preemption_frees_latest_and_it_comes_back_first():
    # 4 blocks of 2 slots; two 4-token prompts fill the cache exactly.
    sched, bm = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    a, b, c = make_seq(0, 4), make_seq(1, 4), make_seq(2, 2)
    sched.add_seqs([a, b])
    out = sched.schedule()
    sched.postprocess(out.scheduled_seqs, [30, 31])
    sched.add_seq(c)  # arrives later, cannot fit
    out = sched.schedule()  # decode: a needs a block -> b (latest running) is preempted
    assert not out.is_prefill and out.scheduled_seqs == [a] and out.preempted_seqs == [b]
    assert b.status == SequenceStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]
    sched.postprocess(out.scheduled_seqs, [40])
    sched.abort_request("r0")  # a leaves; b is recomputed first, with its generated token
    out = sched.schedule()
    assert out.is_prefill and out.scheduled_seqs[0] is b
    assert out.query_lens[0] == 5 and out.input_token_ids()[:5] == b.prompt_token_ids + [31]


def test_latest_sequence_preempts_itself_when_nothing_later_runs():
    sched, bm = make_scheduler(num_blocks=3, block_size=2, max_model_len=6)
    a, b = make_seq(0, 3), make_seq(1, 2)  # a: 2 blocks, b: 1 block; cache full
    sched.add_seqs([a, b])
    out = sched.schedule()
    sched.postprocess(out.scheduled_seqs, [21, 22])  # a: 4 tokens (fits), b: 3 tokens (needs a block)
    out = sched.schedule()
    assert out.scheduled_seqs == [a] and out.preempted_seqs == [b]
    assert sched.running == [a] and list(sched.waiting) == [b] and bm.num_free_blocks == 1


def test_preempted_sequences_give_the_same_tokens():
    def run(num_blocks):
        sched, bm = make_scheduler(num_blocks=num_blocks, block_size=2, max_model_len=24, max_num_seqs=8)
        seqs = [make_seq(i, 3 + i % 4, max_tokens=10 + i) for i in range(6)]
        sched.add_seqs(seqs)
        steps = run_to_completion(sched, bm)
        return [s.output_token_ids for s in seqs], sum(len(o.preempted_seqs) for o in steps)

    roomy, n_pre_roomy = run(200)
    tight, n_pre_tight = run(12)
    assert n_pre_roomy == 0 and n_pre_tight > 0
    assert tight == roomy
    assert [len(o) for o in roomy] == [10 + i for i in range(6)]


def test_preempted_sequence_keeps_its_adapter_when_rescheduled():
    """Preempted (blocks freed, recompute) then re-admitted: the same lora_request, and the
    recompute prefill carries its adapter id for every recomputed token."""
    sched, bm = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    a, b = make_seq(0, 4, lora=3), make_seq(1, 4, lora=5)
    b_request = b.lora_request
    sched.add_seqs([a, b])
    out = sched.schedule()
    assert out.lora_int_ids == [3, 5]
    sched.postprocess(out.scheduled_seqs, [30, 31])
    out = sched.schedule()  # a needs a block: b is preempted
    assert out.preempted_seqs == [b] and b.status == SequenceStatus.PREEMPTED
    assert b.lora_request is b_request and b.lora_int_id == 5
    sched.postprocess(out.scheduled_seqs, [40])
    sched.abort_request("r0")
    out = sched.schedule()  # b is recomputed: prompt + its generated token
    assert out.is_prefill and out.scheduled_seqs == [b] and out.query_lens == [5]
    assert b.lora_request is b_request and out.lora_int_ids == [5]
    sched.postprocess(out.scheduled_seqs, [41])
    out = sched.schedule()  # and it decodes on with its adapter
    assert out.scheduled_seqs == [b] and out.lora_int_ids == [5] and b.output_token_ids == [31, 41]


def test_preempted_adapter_sequences_give_the_same_tokens():
    """Like test_preempted_sequences_give_the_same_tokens, with a mix of adapters: the fake model's
    tokens depend on the adapter, so a sequence rescheduled without its adapter would differ."""
    def run(num_blocks):
        sched, bm = make_scheduler(num_blocks=num_blocks, block_size=2, max_model_len=24, max_num_seqs=8,
                                   max_loras=3)
        seqs = [make_seq(i, 3 + i % 4, max_tokens=10 + i, lora=(i % 3) or None) for i in range(6)]
        sched.add_seqs(seqs)
        want = {s.seq_id: s.lora_int_id for s in seqs}
        steps = run_to_completion(sched, bm)
        for out in steps:  # every batch, recompute prefills included, runs each sequence with its adapter
            assert out.lora_int_ids == [want[s.seq_id] for s in out.scheduled_seqs]
        preempted = {s.lora_int_id for o in steps for s in o.preempted_seqs}
        return [s.output_token_ids for s in seqs], preempted

    roomy, pre_roomy = run(200)
    tight, pre_tight = run(12)
    assert not pre_roomy and {1, 2} <= pre_tight  # sequences of both adapters were preempted
    assert tight == roomy


def test_max_loras_per_batch_fcfs():
    sched, bm = make_scheduler(max_loras=1)
    a1, b1, a2, base = make_seq(0, 3, lora=1), make_seq(1, 3, lora=2), make_seq(2, 3, lora=1), make_seq(3, 3)
    sched.add_seqs([a1, b1, a2, base])
    out = sched.schedule()
    # a1 takes the slot; b1 waits; a2 is behind b1 so it waits too (no starving b1); base passes.
    assert out.scheduled_seqs == [a1, base]
    assert list(sched.waiting) == [b1, a2]
    sched.postprocess(out.scheduled_seqs, [5, 5])
    sched.finish_seq(a1, SequenceStatus.FINISHED_STOPPED)
    out = sched.schedule()
    assert out.scheduled_seqs == [b1] and list(sched.waiting) == [a2]
    assert len({i for i in out.lora_int_ids if i}) <= 1


def test_max_loras_holds_over_a_full_run():
    sched, bm = make_scheduler(max_loras=2, max_num_seqs=8)
    seqs = [make_seq(i, 2 + i % 3, max_tokens=3 + i % 5, lora=(i % 4) or None) for i in range(12)]
    sched.add_seqs(seqs)
    for out in run_to_completion(sched, bm):
        assert len({i for i in out.lora_int_ids if i}) <= 2
    assert all(s.finish_reason == "length" for s in seqs)


def test_too_long_prompts_are_ignored():
    sched, bm = make_scheduler(num_blocks=64, block_size=4, max_model_len=10)
    long, ok = make_seq(0, 11), make_seq(1, 10)
    sched.add_seqs([long, ok])
    out = sched.schedule()
    assert out.ignored_seqs == [long] and long.status == SequenceStatus.FINISHED_IGNORED
    assert long.finish_reason == "length" and out.scheduled_seqs == [ok]
    sched.postprocess(out.scheduled_seqs, [3])
    assert ok.finish_reason == "length"  # prompt == max_model_len: one token, then capped
    bm.check_no_leaks()


def test_prompt_larger_than_the_kv_cache_is_ignored():
    sched, bm = make_scheduler(num_blocks=2, block_size=4, max_model_len=100)
    assert sched.max_model_len == 8
    seq = make_seq(0, 9)
    sched.add_seq(seq)
    out = sched.schedule()
    assert out.ignored_seqs == [seq] and out.is_empty and not sched.has_unfinished()


def test_abort_waiting_and_running():
    sched, bm = make_scheduler()
    a, b = make_seq(0, 3), make_seq(1, 3)
    c1, c2 = make_seq(2, 3, request_id="c"), make_seq(3, 3, request_id="c")
    sched.add_seqs([a, c1, c2])
    sched.schedule()
    sched.add_seq(b)
    aborted = sched.abort_request(["c", "r1", "unknown"])
    assert {s.seq_id for s in aborted} == {1, 2, 3}
    assert all(s.finish_reason == "abort" and s.block_table == [] for s in aborted)
    assert sched.running == [a] and not sched.waiting
    # A sequence aborted mid-step is skipped by postprocess.
    out = sched.schedule()
    sched.abort_request("r0")
    assert sched.postprocess(out.scheduled_seqs, [9]) == [] and a.output_token_ids == []
    bm.check_no_leaks()


def _finish_after(tokens, **params):
    sched, bm = make_scheduler()
    seq = make_seq(0, 3, **params)
    sched.add_seq(seq)
    for t in tokens:
        out = sched.schedule()
        finished = sched.postprocess(out.scheduled_seqs, [t])
        if finished:
            break
    return seq


def test_stop_conditions():
    s = _finish_after([5, EOS, 6])
    assert (s.output_token_ids, s.finish_reason, s.stop_reason) == ([5, EOS], "stop", None)
    s = _finish_after([5, EOS, 6], ignore_eos=True, max_tokens=3)
    assert (s.output_token_ids, s.finish_reason) == ([5, EOS, 6], "length")
    s = _finish_after([5, 7, 6], stop_token_ids=[7])
    assert (s.output_token_ids, s.finish_reason, s.stop_reason) == ([5, 7], "stop", 7)
    s = _finish_after([EOS, 7, 5, 7], stop_token_ids=[7], min_tokens=3)
    assert (s.output_token_ids, s.finish_reason, s.stop_reason) == ([EOS, 7, 5, 7], "stop", 7)
    s = _finish_after([5] * 10, max_tokens=4)
    assert (len(s.output_token_ids), s.finish_reason, s.block_table) == (4, "length", [])


def test_max_model_len_caps_generation():
    sched, bm = make_scheduler(max_model_len=6)
    seq = make_seq(0, 4, max_tokens=None)
    sched.add_seq(seq)
    run_to_completion(sched, bm)
    assert seq.num_tokens == 6 and seq.finish_reason == "length"


def test_finish_seq_stop_string_overrides_length():
    sched, bm = make_scheduler()
    seq = make_seq(0, 3, max_tokens=1)
    sched.add_seq(seq)
    out = sched.schedule()
    assert sched.postprocess(out.scheduled_seqs, [5]) == [seq]
    sched.finish_seq(seq, SequenceStatus.FINISHED_STOPPED, "###")
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "###")
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish_seq(seq, SequenceStatus.RUNNING)
    bm.check_no_leaks()


def test_add_seq_rejects_used_sequences_and_postprocess_checks_lengths():
    sched, _ = make_scheduler()
    seq = make_seq(0, 3)
    seq.status = SequenceStatus.RUNNING
    with pytest.raises(ValueError, match="only new sequences"):
        sched.add_seq(seq)
    with pytest.raises(ValueError, match="one token per scheduled sequence"):
        sched.postprocess([seq], [1, 2])


def test_scheduler_config_validation():
    assert SchedulerConfig(max_model_len=10000).max_num_batched_tokens == 10000
    with pytest.raises(ValueError, match="smaller than max_model_len"):
        SchedulerConfig(max_num_batched_tokens=100, max_model_len=200)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=300, max_num_batched_tokens=256, max_model_len=128)
    with pytest.raises(ValueError, match="max_loras"):
        SchedulerConfig(max_loras=0)
