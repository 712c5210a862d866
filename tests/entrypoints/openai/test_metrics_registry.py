"""ServerMetrics without a server: one registry per app (two apps in one process keep their own
values), what a StepStats adds, finish reasons, vLLM's 1-2-5 token buckets."""
import random
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from vllm.engine.request_stats import FinishedRequest, StepStats, finish_reason_of
from vllm.entrypoints.openai.metrics import ServerMetrics, token_buckets
from vllm.outputs import CompletionOutput, RequestOutput


def _engine(running: int, lora: bool) -> SimpleNamespace:
    stats = {"requests_running": running, "requests_waiting": 0, "requests_aborted": 0, "requests_failed": 0}
    inner = SimpleNamespace(scheduler=SimpleNamespace(block_manager=SimpleNamespace(num_used_blocks=3, num_blocks=12)),
                            lora_config=SimpleNamespace(max_loras=4) if lora else None)
    return SimpleNamespace(stats=stats, engine=inner, lora_state=(("a", "b"), ("c",), 123.0))


def _samples(m: ServerMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    rows = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(rows) == 1, (name, labels, rows)
    return rows[0]


def test_two_apps_keep_their_own_values():
    rng = random.Random(0)
    one = ServerMetrics(_engine(2, True), "one", 64, lambda: 1, lambda: {("/v1/completions", 200): 5})
    two = ServerMetrics(_engine(0, False), "two", 64, lambda: 0, dict)
    ttfts = [rng.uniform(0.001, 2) for _ in range(5)]
    itls = [rng.uniform(0.001, 0.2) for _ in range(7)]
    reqs = [FinishedRequest(f"r{i}", rng.choice(["stop", "length", "abort"]), rng.randint(1, 60),
                            rng.randint(0, 60), rng.uniform(2, 9)) for i in range(5)]
    failed = FinishedRequest("f", "abort", 3, 1, 0.5, failed=True)
    one.observe(StepStats(prompt_tokens=17, generation_tokens=9, time_to_first_token=ttfts,
                          inter_token_latency=itls, finished=reqs + [failed], prefix_cache_queries=40,
                          prefix_cache_hits=24))
    a, b = _samples(one), _samples(two)
    assert all(dict(ls)["model_name"] == "one" for (n, ls) in a if n.startswith("vllm:"))
    assert _value(a, "vllm:prompt_tokens_total") == 17 and _value(b, "vllm:prompt_tokens_total") == 0
    assert _value(a, "vllm:generation_tokens_total") == 9
    assert _value(a, "vllm:time_to_first_token_seconds_count") == 5
    assert abs(_value(a, "vllm:time_to_first_token_seconds_sum") - sum(ttfts)) < 1e-9
    assert _value(a, "vllm:inter_token_latency_seconds_count") == 7
    assert _value(a, "vllm:e2e_request_latency_seconds_count") == 6  # the failed one has a latency too
    assert _value(a, "vllm:request_prompt_tokens_sum") == sum(r.prompt_tokens for r in reqs) + 3
    for reason in ("stop", "length", "abort"):  # a failed request is not a success
        want = sum(r.finish_reason == reason for r in reqs)
        assert _value(a, "vllm:request_success_total", finished_reason=reason) == want
    assert _value(a, "vllm:num_requests_running") == 2 and _value(b, "vllm:num_requests_running") == 0
    assert _value(a, "vllm:kv_cache_usage_perc") == 0.25
    info = _value(a, "vllm:lora_requests_info", running_lora_adapters="a,b", waiting_lora_adapters="c",
                  max_lora="4")
    assert info == 123.0
    assert not any(n == "vllm:lora_requests_info" for n, _ in b)  # LoRA off: none, as in vLLM
    assert _value(a, "vllm:http_requests_total", path="/v1/completions", status="200") == 5
    assert _value(a, "vllm:prefix_cache_queries_total") == 40 and _value(a, "vllm:prefix_cache_hits_total") == 24
    assert _value(b, "vllm:prefix_cache_queries_total") == 0 == _value(b, "vllm:prefix_cache_hits_total")
    # bucket counts are cumulative and end at the count
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in a.items()
                     if n == "vllm:request_generation_tokens_bucket")
    assert [le for le, _ in buckets] == [1, 2, 5, 10, 20, 50, float("inf")]
    assert [v for _, v in buckets] == [sum(r.generation_tokens <= le for r in reqs + [failed]) for le, _ in buckets]


def test_finish_reason_of_several_samples():
    def out(*reasons):
        return RequestOutput("r", None, [1], [CompletionOutput(i, "", [], finish_reason=r)
                                              for i, r in enumerate(reasons)], True)

    assert finish_reason_of(out("stop")) == "stop"
    assert finish_reason_of(out("stop", "length")) == "length"
    assert finish_reason_of(out("length", "abort", "stop")) == "abort"
    assert finish_reason_of(None) == "abort"


def test_token_buckets():
    assert token_buckets(64) == [1, 2, 5, 10, 20, 50]
    assert token_buckets(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
