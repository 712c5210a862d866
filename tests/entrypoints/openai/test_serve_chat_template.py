"""The chat template's extra inputs through the real server (vLLM's fields): ``chat_template_kwargs``
(Qwen3's ``enable_thinking``), ``reasoning_effort``, ``documents`` and ``continue_final_message``,
on ``/v1/chat/completions`` and ``/tokenize``, against transformers' own rendering of the same
template; bad combinations are 400s naming the field. Demo model, a test template (letters only)."""
import httpx
import pytest
from transformers import AutoTokenizer

from vllm.transformers_utils.chat_template import render_chat

from .conftest import MODEL, Server

# user text then "=", assistant text then "q"; "t" when thinking is off, the effort's first letter,
# and each document's title: all in the demo vocabulary (letters and "=")
TEMPLATE = ("{%- for m in messages -%}{{ m['content'] }}{%- if m['role'] == 'user' -%}={%- else -%}q{%- endif -%}"
            "{%- endfor -%}{%- if documents -%}{%- for d in documents -%}{{ d['title'] }}{%- endfor -%}{%- endif -%}"
            "{%- if enable_thinking is defined and not enable_thinking -%}t{%- endif -%}"
            "{%- if reasoning_effort is defined -%}{{ reasoning_effort[0] }}{%- endif -%}"
            "{%- if add_generation_prompt -%}a{%- endif -%}")
CONV = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_template") / "template.jinja"
    path.write_text(TEMPLATE)
    srv = Server(["--chat-template", str(path)])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf_tok():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.mark.parametrize("fields, kwargs", [
    ({}, dict(add_generation_prompt=True)),
    ({"chat_template_kwargs": {"enable_thinking": False}}, dict(add_generation_prompt=True, enable_thinking=False)),
    ({"reasoning_effort": "high"}, dict(add_generation_prompt=True, reasoning_effort="high")),
    ({"documents": [{"title": "xy", "text": "z"}]}, dict(add_generation_prompt=True,
                                                         documents=[{"title": "xy", "text": "z"}])),
    ({"add_generation_prompt": False, "continue_final_message": True},
     dict(add_generation_prompt=False, continue_final_message=True)),
])
def test_rendering_matches_transformers(server, hf_tok, fields, kwargs):
    want = hf_tok.apply_chat_template(CONV, chat_template=TEMPLATE, tokenize=False, **kwargs)
    ids = hf_tok(want, add_special_tokens=False)["input_ids"]
    r = httpx.post(f"{server.url}/tokenize", json={"model": "demo", "messages": CONV, **fields}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == ids
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "demo", "messages": CONV, "max_tokens": 2, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert render_chat(hf_tok, CONV, chat_template=TEMPLATE, **{k: v for k, v in fields.items()}) == want


@pytest.mark.parametrize("fields, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt (default true)
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_bad_template_inputs_are_400s_naming_the_field(server, fields, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": "demo", "messages": CONV, "max_tokens": 2, **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
