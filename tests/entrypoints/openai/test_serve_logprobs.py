"""logprobs / echo on the real ``vllm serve`` (openai client): values equal the offline LLM's,
streamed equals not streamed, and bad values are 400s after which the server still serves."""
import pytest

from .conftest import MODEL

GREEDY = dict(temperature=0, max_tokens=16)
# Streamed, plain and offline requests may be batched differently: float32 logits then differ in
# the last bits, a relative ~1e-6 (seen: 1.1e-5 on a logprob of -14).
CLOSE = dict(rel=1e-5, abs=1e-5)
CONV = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def offline():
    from vllm import LLM

    return LLM(MODEL, max_model_len=64)


def reference(offline, prompt, logprobs, prompt_logprobs=None):
    from vllm import SamplingParams

    params = SamplingParams(**GREEDY, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    return offline.generate(prompt, params, use_tqdm=False)[0]


def legacy(entries, token_ids):
    """The legacy completions logprobs fields expected for engine entries (None: no logprobs)."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    for t, e in zip(token_ids, entries):
        text = e[t].decoded_token if e else None
        tokens.append(text)
        offsets.append(offset)
        offset += len(text or "")
        values.append(e[t].logprob if e else None)
        tops.append({lp.decoded_token: lp.logprob for lp in e.values()} if e else None)
    return tokens, values, tops, offsets


def fields(lp):
    return lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset


def collect(stream):
    """Per choice index: the streamed text and the concatenated logprobs fields; and the chunks."""
    text, lps, chunks = {}, {}, []
    for chunk in stream:
        for ch in chunk.choices:
            chunks.append(ch)
            text[ch.index] = text.get(ch.index, "") + ch.text
            acc = lps.setdefault(ch.index, ([], [], [], []))
            if ch.logprobs is not None:
                for field, values in zip(acc, fields(ch.logprobs)):
                    field.extend(values)
    return text, lps, chunks


def _ok(client):
    assert client.completions.create(model="demo", prompt="hello=", **GREEDY).choices[0].text == "hello"


def test_completions_logprobs_match_the_offline_engine(client, offline):
    ref = reference(offline, "hello=", 3).outputs[0]
    out = client.completions.create(model="demo", prompt="hello=", logprobs=3, **GREEDY)
    c = out.choices[0]
    tokens, values, tops, offsets = legacy(ref.logprobs, ref.token_ids)
    assert c.text == ref.text and c.logprobs.tokens == tokens and c.logprobs.text_offset == offsets
    assert "".join(tokens).startswith(c.text)  # the EOS token's text follows the text
    assert c.logprobs.token_logprobs == pytest.approx(values, **CLOSE)
    assert c.logprobs.top_logprobs == [pytest.approx(t, **CLOSE) for t in tops]
    assert all(3 <= len(t) <= 4 for t in c.logprobs.top_logprobs)  # top-3, plus the chosen token when outside
    assert client.completions.create(model="demo", prompt="hello=", **GREEDY).choices[0].logprobs is None
    zero = client.completions.create(model="demo", prompt="hello=", logprobs=0, **GREEDY).choices[0].logprobs
    assert [list(t) for t in zero.top_logprobs] == [[tok] for tok in tokens]


def test_completions_logprobs_stream_equals_plain(client):
    kw = dict(model="demo", prompt=["hello=", "abc="], n=2, logprobs=2, **GREEDY)
    plain = client.completions.create(**kw)
    text, lps, chunks = collect(client.completions.create(stream=True, **kw))
    assert sorted(text) == [0, 1, 2, 3]
    for c in plain.choices:
        assert text[c.index] == c.text
        assert lps[c.index][0] == c.logprobs.tokens and lps[c.index][3] == c.logprobs.text_offset
        assert lps[c.index][1] == pytest.approx(c.logprobs.token_logprobs, **CLOSE)
        assert lps[c.index][2] == [pytest.approx(t, **CLOSE) for t in c.logprobs.top_logprobs]
    assert all(ch.logprobs is None or len(ch.logprobs.tokens) >= 1 for ch in chunks)


def test_echo(client, offline):
    plain = client.completions.create(model="upper", prompt="hello=", **GREEDY).choices[0].text
    assert plain == "HELLO"
    assert client.completions.create(model="upper", prompt="hello=", echo=True, **GREEDY).choices[0].text \
        == "hello=HELLO"
    ids = offline.get_tokenizer().encode("abc=")  # a token-id prompt echoes its decoded text
    out = client.completions.create(model="demo", prompt=ids, echo=True, **GREEDY)
    assert out.choices[0].text == "abc=abc"
    out = client.completions.create(model="demo", prompt=["abc=", "hello="], n=2, echo=True, **GREEDY)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == ["abc=abc"] * 2 + ["hello=hello"] * 2
    text, _, chunks = collect(client.completions.create(model="upper", prompt="hello=", echo=True, stream=True,
                                                        **GREEDY))
    assert chunks[0].text == "hello=" and text[0] == "hello=HELLO"


def test_echo_with_logprobs(client, offline):
    ref = reference(offline, "hello=", 2, prompt_logprobs=2)
    entries = ref.prompt_logprobs + ref.outputs[0].logprobs
    tokens, values, tops, offsets = legacy(entries, ref.prompt_token_ids + ref.outputs[0].token_ids)
    tokens[0] = "h"  # the first prompt token has no logprobs, only its text
    out = client.completions.create(model="demo", prompt="hello=", echo=True, logprobs=2, **GREEDY).choices[0]
    assert out.text == "hello=" + ref.outputs[0].text
    assert out.logprobs.tokens == tokens and out.logprobs.tokens[:6] == list("hello=")
    assert out.logprobs.token_logprobs[0] is None and out.logprobs.top_logprobs[0] is None
    # pytest.approx refuses None entries (pytest >= 9.2): the first position is checked above
    assert values[0] is None and out.logprobs.token_logprobs[1:] == pytest.approx(values[1:], **CLOSE)
    assert out.logprobs.top_logprobs[1:] == [pytest.approx(t, **CLOSE) for t in tops[1:]]
    assert out.logprobs.text_offset == list(range(len(tokens)))  # one character per token
    text, lps, chunks = collect(client.completions.create(model="demo", prompt="hello=", echo=True, logprobs=2,
                                                          stream=True, **GREEDY))
    assert chunks[0].text == "hello=" and chunks[0].logprobs.tokens == list("hello=")
    assert chunks[0].logprobs.token_logprobs[0] is None
    assert text[0] == out.text and lps[0][0] == out.logprobs.tokens and lps[0][3] == out.logprobs.text_offset
    assert lps[0][1][0] is None and lps[0][1][1:] == pytest.approx(out.logprobs.token_logprobs[1:], **CLOSE)


def chat_reference(offline, top):
    from vllm import SamplingParams

    return offline.chat(CONV, SamplingParams(**GREEDY, logprobs=top), use_tqdm=False)[0].outputs[0]


def test_chat_logprobs(client, offline):
    ref = chat_reference(offline, 3)
    out = client.chat.completions.create(model="demo", messages=CONV, logprobs=True, top_logprobs=3, **GREEDY)
    choice = out.choices[0]
    content = choice.logprobs.content
    assert [x.token for x in content] == [e[t].decoded_token for t, e in zip(ref.token_ids, ref.logprobs)]
    assert "".join(x.token for x in content).startswith(choice.message.content)
    for x, t, e in zip(content, ref.token_ids, ref.logprobs):
        assert x.logprob == pytest.approx(e[t].logprob, **CLOSE) and x.bytes == list(x.token.encode())
        top = sorted(e.values(), key=lambda lp: lp.rank)[:3]
        assert [y.token for y in x.top_logprobs] == [lp.decoded_token for lp in top]
        assert [y.logprob for y in x.top_logprobs] == pytest.approx([lp.logprob for lp in top], **CLOSE)
        assert all(y.bytes == list(y.token.encode()) for y in x.top_logprobs)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the chosen token is the most likely
    bare = client.chat.completions.create(model="demo", messages=CONV, logprobs=True, **GREEDY).choices[0]
    assert [x.token for x in bare.logprobs.content] == [x.token for x in content]
    assert all(x.top_logprobs == [] for x in bare.logprobs.content)
    assert client.chat.completions.create(model="demo", messages=CONV, **GREEDY).choices[0].logprobs is None


def test_chat_logprobs_stream_equals_plain(client):
    kw = dict(model="rot13", messages=CONV, logprobs=True, top_logprobs=2, **GREEDY)
    plain = client.chat.completions.create(**kw).choices[0]
    text, content = "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            if ch.logprobs is not None:
                assert ch.logprobs.content  # a delta with logprobs carries its tokens
                content.extend(ch.logprobs.content)
    assert text == plain.message.content == "uryyb"
    want = plain.logprobs.content
    assert [(x.token, x.bytes) for x in content] == [(x.token, x.bytes) for x in want]
    assert [x.logprob for x in content] == pytest.approx([x.logprob for x in want], **CLOSE)
    assert [[y.token for y in x.top_logprobs] for x in content] == [[y.token for y in x.top_logprobs] for x in want]
    assert [[y.logprob for y in x.top_logprobs] for x in content] == \
        [pytest.approx([y.logprob for y in x.top_logprobs], **CLOSE) for x in want]


def test_bad_logprobs_are_400_and_the_server_keeps_serving(client, server):
    import httpx
    import openai

    for bad in (6, -1):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="logprobs must be between 0 and 5"):
                client.completions.create(model="demo", prompt="hello=", logprobs=bad, stream=stream, **GREEDY)
            _ok(client)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model="demo", messages=CONV, top_logprobs=2, **GREEDY)
    _ok(client)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be between 0 and 20"):
        client.chat.completions.create(model="demo", messages=CONV, logprobs=True, top_logprobs=21, **GREEDY)
    _ok(client)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "logprobs": 9}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "demo", "messages": CONV,
                                                               "logprobs": False, "top_logprobs": 1}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    _ok(client)
