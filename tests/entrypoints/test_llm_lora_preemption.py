"""A request keeps its LoRA adapter wherever the engine moves or rebuilds its sequences.

On the embedded demo model, whose adapters do visible tasks ('upper' upper-cases
the word, 'rot13' rot13s it, the base model copies it), so a sequence that loses
its adapter half-way shows it: 'PQRST' becomes 'PQRst'.  Covered: preemption by
recompute (a KV cache too small for the batch), aborting other requests of a
mixed batch, and the ``n > 1`` samples of a request.  Every request's tokens
must equal its run in a roomy cache, alone, or with ``n = 1``.
"""
import codecs
import os

import pytest

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.sequence import seed_for_sample

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
ADAPTERS = {name: LoRARequest(name, i + 1, os.path.join(ROOT, "demo_adapters", name))
            for i, name in enumerate(["upper", "rot13"])}
TASKS = {None: lambda w: w, "upper": str.upper, "rot13": lambda w: codecs.encode(w, "rot13")}
# Words of 8-10 letters: prompt (bos + word + '=') and answer (word + eos) fill about 6 blocks of 4 tokens.
WORDS = ["pqrstuvwx", "lanterns", "quietzone", "mangoesjar", "zebrafinch", "velocity", "lighthouse", "cobwebbed"]
ROWS = list(zip(WORDS, [None, "upper", "rot13", "upper", "rot13", None, "upper", "rot13"]))
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def _llm(num_blocks: int) -> LLM:
    # The shipped adapters are r=4: max_lora_rank 8 serves them.
    return LLM(os.path.join(ROOT, "demo_model"), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64,
               block_size=4, num_gpu_blocks_override=num_blocks, max_num_seqs=8)


@pytest.fixture(scope="module")
def roomy():
    return _llm(256)


@pytest.fixture(scope="module")
def reference(roomy):
    """Each row's greedy tokens in a cache that holds every sequence (no preemption)."""
    outs = roomy.generate([f"{w}=" for w, _ in ROWS], GREEDY, lora_request=[ADAPTERS.get(t) for _, t in ROWS],
                          use_tqdm=False)
    for (w, t), o in zip(ROWS, outs):  # the reference does the tasks: the adapters change the tokens
        assert o.outputs[0].text == TASKS[t](w), (w, t)
    return [o.outputs[0].token_ids for o in outs]


def _record_preemptions(monkeypatch, llm: LLM) -> list[str]:
    """The request id of every sequence the scheduler preempts from now on."""
    scheduler = llm.llm_engine.scheduler
    schedule = scheduler.schedule
    preempted: list[str] = []

    def recording():
        out = schedule()
        preempted.extend(s.request_id for s in out.preempted_seqs)
        return out

    monkeypatch.setattr(scheduler, "schedule", recording)
    return preempted


def test_preempted_requests_keep_their_adapters(monkeypatch, reference):
    # 16 blocks of 4 tokens: eight sequences of ~22 tokens need ~48, so the latest ones are preempted
    # (recomputed later) again and again
    llm = _llm(16)
    preempted = _record_preemptions(monkeypatch, llm)
    outs = llm.generate([f"{w}=" for w, _ in ROWS], GREEDY, lora_request=[ADAPTERS.get(t) for _, t in ROWS],
                        use_tqdm=False)
    tasks = {o.request_id: t for (_, t), o in zip(ROWS, outs)}
    assert {"upper", "rot13"} <= {tasks[r] for r in preempted}, preempted  # both adapters' requests were preempted
    for (w, t), want, o in zip(ROWS, reference, outs):
        assert o.outputs[0].token_ids == want, (w, t, o.outputs[0].text)
        assert o.lora_request is ADAPTERS.get(t)


def _step_all(engine, done: dict, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        done.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            return
    raise AssertionError("the engine did not finish its requests")


def test_aborting_requests_leaves_the_others_adapters_and_tokens(reference):
    """Abort a running adapter request and a preempted one mid-run; the rest finish exactly as alone."""
    llm = _llm(16)
    engine = llm.llm_engine
    for i, (w, t) in enumerate(ROWS):
        engine.add_request(str(i), f"{w}=", GREEDY, lora_request=ADAPTERS.get(t))
    done: dict = {}
    for _ in range(100):  # run until a sequence has been preempted
        done.update({o.request_id: o for o in engine.step() if o.finished})
        preempted = [s for s in engine.scheduler.waiting if s.num_preemptions > 0]
        if preempted:
            break
    assert preempted, "the cache was expected to force a preemption"
    waiting = preempted[0].request_id
    running = next(s.request_id for s in engine.scheduler.running if s.lora_int_id == ADAPTERS["upper"].lora_int_id
                   and s.num_output_tokens > 0)
    engine.abort_request([running, waiting])
    _step_all(engine, done)
    for i, want in enumerate(reference):
        if str(i) in (running, waiting):
            assert str(i) not in done or done[str(i)].outputs[0].finish_reason == "abort"
        else:
            assert done[str(i)].outputs[0].token_ids == want, (ROWS[i], done[str(i)].outputs[0].text)


def test_every_sample_of_an_adapter_request_uses_the_adapter(roomy, reference):
    """n > 1: every sample (a forked sequence) runs with the request's adapter: greedy samples
    equal the n=1 run; seeded samples equal n=1 runs with each sample's seed."""
    rows = ROWS[:3]
    prompts = [f"{w}=" for w, _ in rows]
    loras = [ADAPTERS.get(t) for _, t in rows]
    outs = roomy.generate(prompts, SamplingParams(temperature=0, max_tokens=16, n=3), lora_request=loras,
                          use_tqdm=False)
    for want, o in zip(reference, outs):
        assert [c.token_ids for c in o.outputs] == [want] * 3
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, n=3)
    outs = roomy.generate(prompts, seeded, lora_request=loras, use_tqdm=False)
    for prompt, lora, o in zip(prompts, loras, outs):
        for i, sample in enumerate(o.outputs):
            alone = SamplingParams(temperature=1.0, seed=seed_for_sample(1234, i), max_tokens=16)
            want = roomy.generate(prompt, alone, lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids
            assert sample.token_ids == want, (prompt, lora, i)
