"""Property-based fuzzing of the real server: generated hostile requests never get a 5xx, the
server stays healthy, and good requests mixed in keep their exact greedy answers.

``benchmarks/fuzz_server.py`` runs the same generator for thousands of requests.
"""
import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings

from .conftest import MODEL, Server
from .fuzz_requests import KNOWN_FINDINGS, VOCAB_SIZE, FuzzRequest, any_request, check_answer

EXAMPLES = 300
GOOD_EVERY = 15
BODY_LIMIT = 64 * 1024  # --max-request-body-bytes; the generator sends a few bodies just over it


def send(http: httpx.Client, req: FuzzRequest) -> tuple[int, str]:
    """The status and the whole answer (a stream is read to its end); a broken connection is a 599."""
    try:
        with http.stream("POST", req.path, content=req.body, headers=req.headers) as r:
            text = "".join(r.iter_text())
    except httpx.HTTPError as e:
        return 599, f"transport error: {e!r}"
    return r.status_code, text


def good_answer(http: httpx.Client, model: str, word: str) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": f"{word}=", "max_tokens": 16,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def fuzz_server():
    srv = Server(["--max-request-body-bytes", str(BODY_LIMIT)], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    yield srv
    srv.stop()


def test_vocab_size_matches_the_demo_model():
    with open(f"{MODEL}/config.json") as f:
        assert json.load(f)["vocab_size"] == VOCAB_SIZE


def test_generated_requests_never_get_a_5xx(fuzz_server, expected):
    sent = {"n": 0}
    problems: list[str] = []
    with httpx.Client(base_url=fuzz_server.url, timeout=60.0) as http:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(any_request(huge_body_bytes=BODY_LIMIT + 1))
        def fuzz(req: FuzzRequest) -> None:
            if len(problems) >= 20:
                return  # enough to report (and a dead engine would fail everything after)
            status, text = send(http, req)
            problem = check_answer(req, status, text)
            if problem:
                problems.append(problem)
            sent["n"] += 1
            if sent["n"] % GOOD_EVERY == 0:
                model = ["demo", "upper", "rot13"][sent["n"] // GOOD_EVERY % 3]
                try:
                    answer = good_answer(http, model, "hello")
                except AssertionError as e:
                    answer = f"failed: {e}"
                if answer != expected[(model, "hello")]:
                    problems.append(f"good request to {model!r} after {sent['n']} requests: {answer!r}")

        for known in reversed(KNOWN_FINDINGS):  # explicit examples run first, in this order
            fuzz = example(known)(fuzz)
        fuzz()
        assert not problems, f"{len(problems)} bad answers, e.g.:\n" + "\n".join(problems[:10])
        assert sent["n"] >= EXAMPLES * 0.9, f"only {sent['n']} requests were generated"
        assert http.get("/health").status_code == 200
        for model in ("demo", "upper", "rot13"):
            for word in ("world", "lora"):
                assert good_answer(http, model, word) == expected[(model, word)]
