"""Prefix caching through the real server: on by default, --no-enable-prefix-caching turns it off,
and /metrics counts the prompt tokens looked up and reused (vLLM's prefix_cache_queries / _hits)."""
import pytest

from .conftest import MODEL, Server, sample

BS = 4
PROMPT = "prefixcachingthroughtheserver="  # 30 tokens: 7 full blocks, the last token computed anyway


@pytest.fixture(scope="module")
def srv():
    server = Server(["--block-size", str(BS)])
    yield server
    server.stop()


def _counts(url: str) -> tuple[float, float]:
    return sample(url, "vllm:prefix_cache_queries_total"), sample(url, "vllm:prefix_cache_hits_total")


def _complete(url: str, model: str, prompt: str) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30.0, max_retries=0)
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8)
    return r.choices[0].text


def test_flag_reaches_the_engine():
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    parse = lambda *a: engine_args_from(make_parser().parse_args(["serve", "M", *a]))  # noqa: E731
    assert parse().enable_prefix_caching is None  # as EngineArgs' default: on
    def cache_config(*a):
        return engine_args_from(make_parser().parse_args(["serve", MODEL, *a])).create_configs()[1]

    assert cache_config().enable_prefix_caching is True
    assert cache_config("--no-enable-prefix-caching").enable_prefix_caching is False
    assert parse("--no-enable-prefix-caching").enable_prefix_caching is False
    assert parse("--enable-prefix-caching").enable_prefix_caching is True


def test_metrics_count_queries_and_hits(srv):
    url = srv.url
    q0, h0 = _counts(url)
    first = _complete(url, "upper", PROMPT)
    q1, h1 = _counts(url)
    assert (q1 - q0, h1 - h0) == (len(PROMPT), 0)
    again = _complete(url, "upper", PROMPT)
    q2, h2 = _counts(url)
    assert (q2 - q1, h2 - h1) == (len(PROMPT), (len(PROMPT) - 1) // BS * BS)
    assert again == first
    _complete(url, "rot13", PROMPT)  # another adapter: looked up, not reused
    q3, h3 = _counts(url)
    assert (q3 - q2, h3 - h2) == (len(PROMPT), 0)


def test_cache_salt_field_isolates_blocks(srv):
    """The request field ``cache_salt`` (vLLM's): blocks reused only under the same salt; an empty
    salt is a 400 naming the field."""
    import openai

    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=30.0, max_retries=0)
    prompt = "saltedrequestsontheserver="

    def complete(salt):
        return client.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=4,
                                         extra_body={"cache_salt": salt}).choices[0].text

    first = complete("a")
    _, h0 = _counts(srv.url)
    assert complete("b") == first and _counts(srv.url)[1] == h0
    assert complete("a") == first and _counts(srv.url)[1] == h0 + (len(prompt) - 1) // BS * BS
    with pytest.raises(openai.BadRequestError) as e:
        complete("")
    assert e.value.body["param"] == "cache_salt"
