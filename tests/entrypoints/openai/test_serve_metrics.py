"""/metrics of the real server, parsed with prometheus_client's parser: vLLM's names, the model_name
label, exact token counts (equal to the responses' usage) and one histogram observation per request."""
import threading
import time

import pytest

from .conftest import Server, httpx, sample, scrape

GREEDY = dict(temperature=0, max_tokens=12)
# a request that runs for a while (4 of its sequences at a time): 128 sequences of 58 tokens on "upper"
LONG_STREAM = {"model": "upper", "prompt": "hello=", "n": 128, "max_tokens": 58, "ignore_eos": True,
               "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def srv():
    server = Server(["--max-num-seqs", "4"])  # LONG_STREAM runs in many steps
    yield server
    server.stop()


def _completion(url: str, model: str, stream: bool) -> tuple[dict, str]:
    """(usage, finish_reason) of one completion, streamed or not."""
    body = {"model": model, "prompt": "hello=", **GREEDY}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        return r["usage"], r["choices"][0]["finish_reason"]
    return _read_stream(f"{url}/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})


def _chat(url: str, model: str, stream: bool) -> tuple[dict, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "abc"}], **GREEDY}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()
        return r["usage"], r["choices"][0]["finish_reason"]
    return _read_stream(f"{url}/v1/chat/completions",
                        {**body, "stream": True, "stream_options": {"include_usage": True}})


def _read_stream(url: str, body: dict) -> tuple[dict, str]:
    import json

    usage, reason = None, None
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                reason = c.get("finish_reason") or reason
    return usage, reason


COUNTS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
          "vllm:time_to_first_token_seconds_sum", "vllm:inter_token_latency_seconds_count",
          "vllm:e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum",
          "vllm:request_prompt_tokens_count", "vllm:request_prompt_tokens_sum",
          "vllm:request_generation_tokens_count", "vllm:request_generation_tokens_sum"]


@pytest.mark.parametrize("call", [_completion, _chat], ids=["completions", "chat"])
@pytest.mark.parametrize("model", ["demo", "rot13"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_counts_and_sums_are_exact(srv, call, model, stream):
    url = srv.url
    before = {n: sample(url, n) for n in COUNTS}
    success = {r: sample(url, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length", "abort")}
    usage, reason = call(url, model, stream)
    after = {n: sample(url, n) for n in COUNTS}
    d = {n: after[n] - before[n] for n in COUNTS}
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    assert c >= 1 and reason in ("stop", "length")
    assert d["vllm:prompt_tokens_total"] == p and d["vllm:request_prompt_tokens_sum"] == p
    assert d["vllm:generation_tokens_total"] == c and d["vllm:request_generation_tokens_sum"] == c
    for n in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
              "request_generation_tokens"):
        assert d[f"vllm:{n}_count"] == 1, n  # one observation per request
    assert d["vllm:inter_token_latency_seconds_count"] == c - 1  # one per later token (n=1: one per step)
    assert 0 < d["vllm:time_to_first_token_seconds_sum"] <= d["vllm:e2e_request_latency_seconds_sum"]
    for r, v in success.items():
        assert sample(url, "vllm:request_success_total", finished_reason=r) == v + (r == reason), r
    assert sample(url, "vllm:num_requests_running") == 0 and sample(url, "vllm:num_requests_waiting") == 0


def test_names_labels_and_types(srv):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{srv.url}/metrics", timeout=5).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
             "vllm:kv_cache_usage_perc": "gauge", "vllm:lora_requests_info": "gauge",
             "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
             "vllm:request_success": "counter", "vllm:prefix_cache_queries": "counter",
             "vllm:prefix_cache_hits": "counter", "vllm:request_aborted": "counter",
             "vllm:lora_adapters_loaded": "gauge", "vllm:http_requests": "counter",
             "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
             "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_prompt_tokens": "histogram",
             "vllm:request_generation_tokens": "histogram"}
    for name, kind in kinds.items():
        assert name in families and families[name].type == kind, name
    for family in families.values():
        if family.name.startswith("vllm:"):
            assert all(s.labels.get("model_name") == "demo" for s in family.samples), family.name
    assert sample(srv.url, "vllm:lora_adapters_loaded") == 2
    assert 0 <= sample(srv.url, "vllm:kv_cache_usage_perc") <= 1
    # soak.py / fuzz_server.py read the gauges as plain lines "name{labels} value"
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_running{")]
    assert len(lines) == 1 and float(lines[0].rsplit(" ", 1)[1]) == 0


def _lora_info(url: str) -> dict:
    (labels, value), = scrape(url)["vllm:lora_requests_info"].items()
    return dict(labels) | {"value": value}


def _until(url: str, want: tuple, timeout: float = 10.0) -> tuple[tuple, dict]:
    """Polls /metrics until (running adapters, waiting adapters, requests running, requests waiting) - read from
    one scrape - equal ``want``; returns the last state read and its lora info.  The gauges are a snapshot after
    each step: between two waves of LONG_STREAM's sequences (4 finish in the same step) none runs for a step,
    so a single read may see that instant."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        (labels, value), = m["vllm:lora_requests_info"].items()
        info = dict(labels) | {"value": value}
        counts = [v for k, v in m["vllm:num_requests_running"].items() if ("model_name", "demo") in k] + \
                 [v for k, v in m["vllm:num_requests_waiting"].items() if ("model_name", "demo") in k]
        state = (info["running_lora_adapters"], info["waiting_lora_adapters"], *counts)
        if state == want or time.monotonic() > deadline:
            return state, info
        time.sleep(0.05)


def test_lora_requests_info_names_the_running_adapter(srv):
    url = srv.url
    info = _lora_info(url)
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"], info["max_lora"]) == ("", "", "2")
    aborted = sample(url, "vllm:request_success_total", finished_reason="abort")
    with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response, which aborts the request
        next(lines)
        state, info = _until(url, ("upper", "", 1, 0))
        assert state == ("upper", "", 1, 0) and info["model_name"] == "demo"
        assert abs(info["value"] - time.time()) < 60  # a Unix time, as vLLM's
        # a request on another adapter waits behind it (FCFS, 4 sequences at a time); its response
        # starts only once it runs, so it is sent from a thread
        waiter = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                  kwargs={"json": {"model": "rot13", "prompt": "abc=", **GREEDY}, "timeout": 60})
        waiter.start()
        state, _ = _until(url, ("upper", "rot13", 1, 1))
        assert state == ("upper", "rot13", 1, 1)
    # the client left: its request is aborted, the waiting one runs and ends; the gauges follow at once
    waiter.join(60)
    deadline = time.monotonic() + 10
    while _lora_info(url)["running_lora_adapters"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lora_info(url)["running_lora_adapters"] == ""
    assert sample(url, "vllm:num_requests_running") == 0 and sample(url, "vllm:num_requests_waiting") == 0
    assert sample(url, "vllm:request_success_total", finished_reason="abort") == aborted + 1
    assert sample(url, "vllm:request_aborted_total") >= 1
