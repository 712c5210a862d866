"""The scheduler with prefix caching: prefills fed only past the cached blocks, at least the last
token computed, prompt logprobs computed whole, n > 1 siblings sharing their prompt blocks,
preemption and abort; a random workload against a fake KV store and against caching off."""
import random
from dataclasses import dataclass

from vllm.config.scheduler import SchedulerConfig
from vllm.core.block_manager import BlockManager
from vllm.core.scheduler import Scheduler
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceStatus

BS = 4


@dataclass
class FakeLoRA:
    lora_int_id: int
    lora_name: str = ""
    lora_path: str = ""


def make_seq(seq_id, tokens, max_tokens=6, lora=None, request_id=None, index=0, **params):
    return Sequence(seq_id, request_id or f"r{seq_id}", list(tokens), SamplingParams(max_tokens=max_tokens, **params),
                    index=index, lora_request=FakeLoRA(lora, f"l{lora}", f"/p{lora}") if lora else None,
                    arrival_time=float(seq_id))


def make_scheduler(num_blocks=64, caching=True, **cfg):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching)
    cfg.setdefault("max_model_len", 64)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def fake_token(seq):
    """A 'model': the next token depends on the adapter and the whole token history."""
    return 10 + hash((seq.lora_int_id, tuple(seq.token_ids))) % 50


class FakeModel:
    """Writes what a real model would store at each fed position (adapter, tokens up to it), then
    checks that every context position each sequence attends over holds its own (that is where a
    cached block from another adapter or another prefix would show)."""

    def __init__(self, bm):
        self.bm, self.kv = bm, {}

    def step(self, sched, out):
        for seq, c, q in zip(out.scheduled_seqs, out.context_lens, out.query_lens):
            for p in range(c, c + q):
                self.kv[self.bm.get_slot(seq, p)] = (seq.lora_int_id, tuple(seq.token_ids[:p + 1]))
        for seq, n in zip(out.scheduled_seqs, out.seq_lens):
            for p in range(n):
                assert self.kv.get(self.bm.get_slot(seq, p)) == (seq.lora_int_id, tuple(seq.token_ids[:p + 1])), \
                    (seq, p)
        sched.postprocess(out.scheduled_seqs, [fake_token(s) for s in out.scheduled_seqs])


def run(sched, bm, seqs, max_steps=2000):
    sched.add_seqs(seqs)
    model, steps = FakeModel(bm), []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        steps.append(out)
        if not out.is_empty:
            model.step(sched, out)
    assert not sched.has_unfinished()
    bm.check_no_leaks()
    return steps


def test_repeated_prompt_feeds_only_the_uncached_tail():
    sched, bm = make_scheduler()
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks + 2
    run(sched, bm, [make_seq(0, prompt)])
    assert (sched.prefix_cache_stats.queries, sched.prefix_cache_stats.hits) == (14, 0)
    b = make_seq(1, prompt)
    sched.add_seq(b)
    out = sched.schedule()
    assert out.context_lens == [12] and out.query_lens == [2] and b.num_computed_tokens == 12
    assert (sched.prefix_cache_stats.queries, sched.prefix_cache_stats.hits) == (28, 12)
    model = FakeModel(bm)
    model.kv.update({bm.get_slot(b, p): (0, tuple(prompt[:p + 1])) for p in range(12)})  # the cached K/V
    model.step(sched, out)


def test_a_prompt_of_whole_blocks_still_computes_its_last_block():
    sched, bm = make_scheduler()
    prompt = list(range(10, 22))  # exactly 3 blocks
    run(sched, bm, [make_seq(0, prompt)])
    sched.add_seq(make_seq(1, prompt))
    out = sched.schedule()
    assert out.context_lens == [8] and out.query_lens == [4]  # the last token's logits are needed


def test_prompt_logprobs_requests_compute_the_whole_prompt():
    sched, bm = make_scheduler()
    prompt = list(range(10, 24))
    run(sched, bm, [make_seq(0, prompt)])
    queried = sched.prefix_cache_stats.queries
    sched.add_seq(make_seq(1, prompt, prompt_logprobs=1))
    out = sched.schedule()
    assert out.context_lens == [0] and out.query_lens == [14]
    assert sched.prefix_cache_stats.queries == queried  # not looked up


def test_another_adapter_or_the_base_model_does_not_reuse_blocks():
    sched, bm = make_scheduler()
    prompt = list(range(10, 24))
    run(sched, bm, [make_seq(0, prompt, lora=1)])
    for i, lora in enumerate([2, None, 1]):
        seq = make_seq(1 + i, prompt, lora=lora)
        sched.add_seq(seq)
        out = sched.schedule()
        assert out.context_lens == [12 if lora == 1 else 0], lora
        sched.abort_request(seq.request_id)


def test_n_siblings_share_their_prompt_blocks_in_the_same_step():
    sched, bm = make_scheduler()
    prompt = list(range(10, 24))
    sibs = [make_seq(i, prompt, request_id="r", index=i, n=3, temperature=1.0) for i in range(3)]
    sched.add_seqs(sibs)
    out = sched.schedule()
    assert out.context_lens == [0, 12, 12] and out.query_lens == [14, 2, 2]
    assert sibs[1].block_table[:3] == sibs[2].block_table[:3] == sibs[0].block_table[:3]
    assert [bm.ref_count(b) for b in sibs[0].block_table] == [3, 3, 3, 1]
    assert len(set(s.block_table[3] for s in sibs)) == 3  # each writes its own last block
    FakeModel(bm).step(sched, out)  # the siblings read the K/V the first one writes in the same step


def test_siblings_share_only_the_blocks_their_tokens_agree_on():
    """Siblings recomputed after a preemption carry different outputs: only the common blocks are shared."""
    sched, bm = make_scheduler()
    prompt = list(range(10, 16))  # 6 tokens; outputs differ from position 6 on
    sibs = [make_seq(i, prompt, request_id="r", index=i, n=2, temperature=1.0) for i in range(2)]
    for i, s in enumerate(sibs):
        for t in range(6):
            s.append_token_id(20 + 10 * i + t)
    sched.add_seqs(sibs)
    out = sched.schedule()
    assert out.context_lens == [0, 4] and sibs[1].block_table[0] == sibs[0].block_table[0]
    assert sibs[1].block_table[1] != sibs[0].block_table[1]
    FakeModel(bm).step(sched, out)


def test_a_preempted_sequence_restarts_from_its_cached_blocks():
    # 9 blocks: both prompts take 4; at position 16 both need a fifth, b is preempted with 4 computed
    # full blocks (cached when freed); a finishes in 5 blocks, so b's stay cached
    sched, bm = make_scheduler(num_blocks=9, max_num_seqs=4)
    a, b = make_seq(0, list(range(10, 23)), max_tokens=6), make_seq(1, list(range(30, 43)), max_tokens=6)
    steps = run(sched, bm, [a, b])
    preempted = [s for out in steps for s in out.preempted_seqs]
    assert b in preempted
    # b's readmission started past the blocks it had computed before
    readmitted = [c for out in steps if out.is_prefill for s, c in zip(out.scheduled_seqs, out.context_lens) if s is b]
    assert readmitted == [0, 16]
    assert b.num_output_tokens == 6


def test_abort_leaves_reusable_blocks():
    sched, bm = make_scheduler()
    prompt = list(range(10, 24))
    a = make_seq(0, prompt)
    sched.add_seq(a)
    FakeModel(bm).step(sched, sched.schedule())
    sched.abort_request("r0")
    assert a.status == SequenceStatus.FINISHED_ABORTED
    bm.check_no_leaks()
    sched.add_seq(make_seq(1, prompt))
    assert sched.schedule().context_lens == [12]


def _workload(seed):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, 60) for _ in range(rng.randrange(3, 20))] for _ in range(3)]
    seqs, sid = [], 0
    for r in range(14):
        toks = rng.choice(prefixes) + [rng.randrange(10, 60) for _ in range(rng.randrange(0, 5))]
        lora, n = rng.choice([None, 1, 2]), rng.choice([1, 1, 2, 3])
        for i in range(n):
            seqs.append(make_seq(sid, toks, max_tokens=rng.randrange(1, 12), lora=lora, request_id=f"q{r}",
                                 index=i, n=n, temperature=1.0 if n > 1 else 0.0))
            sid += 1
    return seqs


def test_random_workload_matches_caching_off():
    for seed in range(6):
        results = {}
        for caching in (False, True):
            sched, bm = make_scheduler(num_blocks=14, caching=caching, max_num_seqs=6, max_loras=2)
            seqs = _workload(seed)
            steps = run(sched, bm, seqs)
            results[caching] = [s.output_token_ids for s in seqs]
            if caching:
                stats = sched.prefix_cache_stats
                fed_from_cache = sum(c for out in steps if out.is_prefill for c in out.context_lens)
                assert stats.hits == fed_from_cache > 0
                assert any(out.preempted_seqs for out in steps)
        assert results[True] == results[False], seed
