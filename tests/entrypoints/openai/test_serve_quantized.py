"""``vllm serve`` on 4-bit checkpoints with two adapters, driven by the openai client: a GPTQ (act-order,
asymmetric) Qwen3-MoE checkpoint on ``Int4MoEMethod`` and an MXFP4 gpt-oss checkpoint on the MXFP4
experts.  One concurrent batch of base and adapter requests gives, request by request, the greedy
tokens of transformers + peft running the dequantised weights."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model
from tests.entrypoints.tiny_models import char_tokenizer

from .conftest import Server

MAX_TOKENS = 10
JOBS = [(None, "hello world"), (0, "the quick brown fox"), (1, "xyz 123 xyz"), (0, "abc"), (None, "abc")]


def _serve_and_compare(path: str, hf, tok, adapters, extra=()) -> None:
    import openai

    args = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-model-len", "128",
            "--dtype", "float32", "--lora-modules", f"a0={adapters[0]}", f"a1={adapters[1]}", *extra]
    srv = Server(model=path, base_args=args, timeout=120)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=60.0, max_retries=0)

        def ask(job):
            which, prompt = job
            out = client.completions.create(model="demo" if which is None else f"a{which}", prompt=prompt,
                                            temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
            return out.choices[0]

        with ThreadPoolExecutor(len(JOBS)) as pool:
            choices = list(pool.map(ask, JOBS))
    finally:
        srv.stop()
    for (which, prompt), choice in zip(JOBS, choices):
        ref_model = hf if which is None else peft_model(hf, adapters[which])
        want = greedy(ref_model, tok, prompt, MAX_TOKENS)
        assert choice.text == tok.decode(want, skip_special_tokens=True), (which, prompt)
    assert choices[1].text != tok.decode(greedy(hf, tok, JOBS[1][1], MAX_TOKENS), skip_special_tokens=True), \
        "the adapter changes the output"


@pytest.mark.slow
def test_gptq_act_order_checkpoint_with_adapters(tmp_path):
    pytest.importorskip("vllm.model_executor.layers.fused_moe.int4_fused_moe_method")
    from tests.quantization.test_int4_models import Case

    case = Case(tmp_path, "qwen3_moe", "gptq", asym=True, act_order=True)
    _serve_and_compare(case.path, case.hf, case.tok, case.adapters)


@pytest.mark.slow
def test_mxfp4_gpt_oss_checkpoint_with_adapters(tmp_path):
    pytest.importorskip("vllm.model_executor.layers.quantization.mxfp4")
    from tests.models.test_gpt_oss_mxfp4 import _mxfp4_checkpoint

    hf = _mxfp4_checkpoint(tmp_path)
    adapters = [str(make_peft_adapter(hf, tmp_path / f"a{i}", rank=r, seed=30 + i, dense_mlp=False))
                for i, r in enumerate([8, 4])]
    _serve_and_compare(str(tmp_path), hf, char_tokenizer(), adapters)
