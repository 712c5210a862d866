"""The real server started from a hub id in a local hub cache at a revision, with the model's
generation_config.json defaults and a --chat-template override, driven with the openai client."""
import json
import os
import shutil

import pytest

from tests.entrypoints.openai.conftest import MODEL, Server

COMMIT_MAIN, COMMIT_GEN = "1" * 40, "2" * 40
TEMPLATE = "{{ messages[-1]['content'] | upper }}="


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """Org/Demo: main = the demo model; branch "gen" = the demo model with sampling defaults
    (top_k=1: greedy; at most 3 new tokens)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--Org--Demo"
    shutil.copytree(MODEL, repo / "snapshots" / COMMIT_MAIN)
    gen = repo / "snapshots" / COMMIT_GEN
    shutil.copytree(MODEL, gen)
    config = json.loads((gen / "generation_config.json").read_text())
    config.update(top_k=1, temperature=0.7, max_new_tokens=3)
    (gen / "generation_config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    (repo / "refs" / "gen").write_text(COMMIT_GEN)
    return cache


@pytest.fixture(scope="module")
def greedy():
    """Offline greedy tokens of the demo folder: prompt -> up to 8 token ids (ignore_eos)."""
    from vllm import LLM, SamplingParams

    llm = LLM(MODEL, max_model_len=64)
    prompts = ["hello=", "HELLO="]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return {p: (o.outputs[0].text, list(o.outputs[0].token_ids), len(o.prompt_token_ids))
            for p, o in zip(prompts, outs)}


@pytest.fixture(scope="module")
def served(hub_cache, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "upper.jinja"
    template.write_text(TEMPLATE)
    srv = Server(["--revision", "gen", "--chat-template", str(template)], model="Org/Demo",
                 env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=30.0, max_retries=0)


def test_generation_config_defaults_fill_unset_fields(served, client, greedy):
    out = client.completions.create(model="demo", prompt="hello=", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3  # max_new_tokens, not completions' 16
    assert out.choices[0].text == client.completions.create(
        model="demo", prompt="hello=", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert greedy["hello="][0].startswith(out.choices[0].text) and out.choices[0].finish_reason == "length"
    assert "default sampling parameters come from" in served.read_log()


def test_request_fields_override_the_defaults(client, greedy):
    out = client.completions.create(model="demo", prompt="hello=", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 6
    assert out.choices[0].text == greedy["hello="][0][:len(out.choices[0].text)]


def test_chat_template_override(client, greedy):
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    text, ids, n_prompt = greedy["HELLO="]
    assert out.usage.prompt_tokens == n_prompt  # "HELLO=", as the override renders it
    assert out.choices[0].message.content == text


def test_hub_id_not_cached_fails_at_start_with_how_to_download(hub_cache):
    with pytest.raises(RuntimeError) as e:
        Server(model="Org/Missing", env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert "not in the local Hugging Face cache" in str(e.value) and "hf download Org/Missing" in str(e.value)


def test_bad_chat_template_fails_at_start(tmp_path):
    with pytest.raises(RuntimeError, match="not a file and does not look like a Jinja template"):
        Server(["--chat-template", str(tmp_path / "missing.jinja")])
