"""Penalties and token constraints on the real ``vllm serve`` (completions and chat, through the
``openai`` client): applied, and their bad values refused with a 400 naming the field."""
import pytest

from .test_serve_fields import _ok, chat, completion, refused

Z, X = "56", "54"  # the demo tokenizer's ids of "Z" and "X" (tests/entrypoints/test_llm_sampling.py checks them)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def test_logit_bias_forces_a_token_in_both_endpoints(client):
    r = client.completions.create(model="upper", prompt="hello=", temperature=0, max_tokens=6, logit_bias={Z: 100})
    assert r.choices[0].text == "Z" * 6
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=5, logit_bias={X: 100})
    assert r.choices[0].message.content == "X" * 5


def test_penalties_and_constraints_are_applied(client):
    def text(**extra):
        return client.completions.create(model="demo", prompt="aaaaaaaa=", temperature=0, max_tokens=16,
                                         extra_body=extra.pop("extra_body", None), **extra).choices[0].text

    base = text()
    assert text(presence_penalty=2.0) != base
    assert text(frequency_penalty=0, presence_penalty=0) == base
    assert text(extra_body={"repetition_penalty": 1.0, "min_p": 0.0}) == base
    assert set(text(extra_body={"allowed_token_ids": [int(Z), int(X)]})) <= {"Z", "X"}
    assert "a" not in text(extra_body={"bad_words": ["a"]})


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                         ("repetition_penalty", 0), ("logit_bias", {"abc": 1}),
                                         ("logit_bias", {"100000": 1}), ("allowed_token_ids", [100000]),
                                         ("allowed_token_ids", [])])
def test_bad_values_are_400s_naming_the_field(server, field, value):
    refused(completion(server, **{field: value}), field)
    refused(chat(server, **{field: value}), field)
    _ok(server)


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, server):
    """Completions and chat: only the last k prompt tokens reach the model (vLLM's left truncation)."""
    r = client.completions.create(model="upper", prompt="xyzzy plugh hello=", temperature=0, max_tokens=8,
                                  extra_body={"truncate_prompt_tokens": 6})  # "hello=" is 6 tokens
    assert r.choices[0].text == "HELLO" and r.usage.prompt_tokens == 6
    r = client.completions.create(model="demo", prompt=[5, 6, 7] * 30 + [12, 9, 16, 16, 19, 4], temperature=0,
                                  max_tokens=4, echo=True, extra_body={"truncate_prompt_tokens": 6})
    assert r.choices[0].text == "hello=hell" and r.usage.prompt_tokens == 6  # echo: the tokens kept
    full = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                          temperature=0, max_tokens=4)
    cut = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                         max_tokens=4, extra_body={"truncate_prompt_tokens": 2})
    assert full.usage.prompt_tokens > 2 and cut.usage.prompt_tokens == 2
    r = completion(server, prompt="hello=", truncate_prompt_tokens=-1)  # -1: up to max_model_len, here all
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HELLO", r.text


@pytest.mark.parametrize("value,words", [(65, "more than this model's maximum context length"),
                                         (0, "greater than or equal to -1"), (-2, "greater than or equal to -1")])
def test_truncate_prompt_tokens_bad_values(server, value, words):
    if value == 0:
        words = "truncate_prompt_tokens must be an integer >= 1"
    assert words in refused(completion(server, truncate_prompt_tokens=value), "truncate_prompt_tokens")
    assert words in refused(chat(server, truncate_prompt_tokens=value), "truncate_prompt_tokens")


def test_best_of_is_n_or_refused_and_suffix_is_refused(client, server):
    r = client.completions.create(model="demo", prompt="hello=", n=2, best_of=2, temperature=0, max_tokens=8)
    assert [c.text for c in r.choices] == ["hello", "hello"]
    msg = refused(completion(server, n=1, best_of=2), "best_of")
    assert "best_of is not supported when it differs from n" in msg and "set it to n" in msg
    msg = refused(completion(server, suffix="!"), "suffix")
    assert "suffix is not supported" in msg and "leave it out" in msg


def test_n_with_a_seed_is_reproducible_and_the_samples_differ(client):
    def texts(seed):
        r = client.completions.create(model="demo", prompt="hello=", n=4, seed=seed, temperature=5.0, max_tokens=12)
        return [c.text for c in r.choices]

    first = texts(11)
    assert texts(11) == first and len(set(first)) > 1 and texts(12) != first
