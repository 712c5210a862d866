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
