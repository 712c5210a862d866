"""LLM.generate end to end on tiny random checkpoints, against transformers."""
import pytest
import torch

from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm import LLM, SamplingParams

ARCHS = ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"]
PROMPTS = ["hello world", "abc", "the quick brown fox", "x"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def hf_greedy(hf, tok, prompt, n):
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tmp_path_factory):
    path, hf, tok = tiny_model_dir(request.param, tmp_path_factory.mktemp(request.param))
    llm = LLM(path, max_model_len=128, block_size=4, num_gpu_blocks_override=256)
    return llm, hf, tok


def test_greedy_matches_transformers(model):
    llm, hf, tok = model
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt == prompt and out.finished
        assert out.outputs[0].token_ids == hf_greedy(hf, tok, prompt, 16), prompt
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


def test_batch_equals_prompts_alone(model):
    llm, _, _ = model
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    alone = [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert together == alone


def test_preemption_gives_the_same_tokens(tmp_path):
    path, hf, tok = tiny_model_dir("qwen3_moe", tmp_path)
    # 12 blocks of 4 tokens: four sequences growing to ~30 tokens cannot all fit, so some are preempted
    llm = LLM(path, max_model_len=64, block_size=4, num_gpu_blocks_override=12, max_num_seqs=4,
              max_num_batched_tokens=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, tok, prompt, 20)


def test_sampling_options(model):
    llm, _, _ = model
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True, n=2)
    a = llm.generate(["hello", "abc"], p, use_tqdm=False)
    b = llm.generate(["abc"], p, use_tqdm=False)
    assert [c.token_ids for c in a[1].outputs] == [c.token_ids for c in b[0].outputs]  # seeded: batch-independent
    assert len(a[0].outputs) == 2 and a[0].outputs[0].token_ids != a[0].outputs[1].token_ids
    # a stop string cuts the text and finishes with 'stop'
    full = llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = full[3:5]
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == full[:full.index(stop)]
    # a stop token id
    first = llm.generate("abc", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[first[2]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == first[:3] and out.finish_reason == "stop" and out.stop_reason == first[2]


def test_chat_uses_the_template(model):
    llm, hf, tok = model
    conv = [{"role": "user", "content": "hi"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tok.encode(want)
    assert out.outputs[0].token_ids == hf_greedy(hf, tok, want, 16)


def test_bad_requests_fail_clearly_and_the_engine_keeps_serving(model):
    llm, hf, tok = model
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["a" * 200, "abc"], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        from vllm.lora.request import LoRARequest

        llm.generate("abc", GREEDY, lora_request=LoRARequest("x", 1, "/nonexistent"), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate("abc", GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, tok, "abc", 16)


def test_unknown_engine_argument(tmp_path):
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(str(tmp_path), max_lorass=3)


@pytest.mark.parametrize("dtype,want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32), ("auto", torch.float32)])
def test_dtype(tmp_path, dtype, want):
    path, hf, tok = tiny_model_dir("qwen3_moe", tmp_path)
    llm = LLM(path, dtype=dtype, max_model_len=64, block_size=4, num_gpu_blocks_override=64)
    engine = llm.llm_engine
    assert next(engine.model.parameters()).dtype == want and engine.kv_caches[0].dtype == want
    out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)
    if want == torch.float32:
        assert out[0].outputs[0].token_ids == hf_greedy(hf, tok, PROMPTS[0], 16)


def test_bad_dtype(tmp_path):
    path, _, _ = tiny_model_dir("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="int8")


def test_final_only_outputs(model):
    """LLM.generate asks for final outputs only (and leaves the caller's params alone); the engine
    then returns a request's output once, when it finishes, while CUMULATIVE returns one per step."""
    from vllm.sampling_params import RequestOutputKind

    llm, _, _ = model
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert params.output_kind == RequestOutputKind.CUMULATIVE
    engine = llm.llm_engine
    seen = {"final": [], "cumulative": []}
    engine.add_request("final", PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                           output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("cumulative", PROMPTS[0], params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [o.finished for o in seen["final"]] == [True]
    assert len(seen["cumulative"]) == 5 and seen["cumulative"][-1].finished
    assert seen["final"][0].outputs[0].token_ids == seen["cumulative"][-1].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)
