"""``/metrics``: Prometheus metrics with vLLM's names, through ``prometheus_client``.

Each app has its own ``CollectorRegistry`` (no global state: several servers may live in
one process).  Every metric carries the ``model_name`` label (the first served model name).

- Read from the engine when scraped (``EngineCollector``): ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (a fraction, 1 = 100 %),
  ``vllm:lora_requests_info`` (with LoRA on: labels ``running_lora_adapters``,
  ``waiting_lora_adapters`` (comma-separated adapter names) and ``max_lora``; the value is
  the Unix time at which the engine counted them, as in vLLM), and the project's
  ``vllm:request_aborted_total``, ``vllm:request_failed_total``, ``vllm:lora_adapters_loaded``
  and ``vllm:http_requests_total`` (labels ``path``, ``status``).
- Fed by the engine's ``StepStats`` (``ServerMetrics.observe``): ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total``, ``vllm:request_success_total`` (label ``finished_reason``:
  stop / length / abort), and the histograms ``vllm:time_to_first_token_seconds``,
  ``vllm:inter_token_latency_seconds``, ``vllm:e2e_request_latency_seconds``,
  ``vllm:request_prompt_tokens``, ``vllm:request_generation_tokens``.
- Also fed by ``StepStats``: ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` (counters, in
  tokens, as vLLM's): prompt tokens looked up in the prefix cache and those found there (0 with
  ``--no-enable-prefix-caching``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vllm.engine.request_stats import StepStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's 1-2-5 series)."""
    out, mantissa, exponent = [], (1, 2, 5), 0
    while True:
        for m in mantissa:
            value = m * 10 ** exponent
            if value > max_model_len:
                return out
            out.append(value)
        exponent += 1


class EngineCollector(Collector):
    """The metrics read from the engine and the server's state at scrape time."""

    def __init__(self, engine: Any, model_name: str, adapters_loaded: Callable[[], int],
                 http_requests: Callable[[], dict[tuple[str, int], int]]) -> None:
        self.engine = engine
        self.model_name = model_name
        self.adapters_loaded = adapters_loaded
        self.http_requests = http_requests

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c

    def collect(self) -> Iterable[Metric]:
        stats = self.engine.stats
        yield self._gauge("vllm:num_requests_running", "Requests with a sequence running.",
                          stats["requests_running"])
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to run.", stats["requests_waiting"])
        bm = self.engine.engine.scheduler.block_manager  # two ints read from this thread: a snapshot is enough
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.",
                          bm.num_used_blocks / max(bm.num_blocks, 1))
        lora_config = self.engine.engine.lora_config
        if lora_config is not None:
            running, waiting, when = self.engine.lora_state
            info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting adapters (the value: when "
                                     "they were counted, Unix time).",
                                     labels=["model_name", "running_lora_adapters", "waiting_lora_adapters",
                                             "max_lora"])
            info.add_metric([self.model_name, ",".join(running), ",".join(waiting), str(lora_config.max_loras)],
                            when)
            yield info
        yield self._counter("vllm:request_aborted", "Aborted requests.", stats["requests_aborted"])
        yield self._counter("vllm:request_failed", "Requests that failed inside the engine.",
                            stats["requests_failed"])
        yield self._gauge("vllm:lora_adapters_loaded", "Adapters served.", self.adapters_loaded())
        http = CounterMetricFamily("vllm:http_requests", "HTTP requests to /v1 routes by route and status.",
                                   labels=["model_name", "path", "status"])
        for (path, status), value in sorted(self.http_requests().items()):
            http.add_metric([self.model_name, path, str(status)], value)
        yield http


class ServerMetrics:
    """The app's registry; ``observe`` is the engine's stats observer (thread-safe)."""

    def __init__(self, engine: Any, model_name: str, max_model_len: int, adapters_loaded: Callable[[], int],
                 http_requests: Callable[[], dict[tuple[str, int], int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        reg, labels = self.registry, ["model_name"]
        self.registry.register(EngineCollector(engine, model_name, adapters_loaded, http_requests))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens admitted.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=reg)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens "
                                            "(prompt tokens looked up).", labels, registry=reg)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens (prompt tokens "
                                         "whose KV was reused).", labels, registry=reg)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token: arrival to the step "
                              "that produced it.", labels, buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between steps that produced a "
                             "request's tokens.", labels, buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency: arrival to its end.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        tokens = token_buckets(max_model_len)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                        buckets=tokens, registry=reg)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.",
                                            labels, buckets=tokens, registry=reg)
        # every series present (at 0) from the start, as in vLLM
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        for metric in (self.prompt_tokens, self.generation_tokens, self.prefix_cache_queries,
                       self.prefix_cache_hits, self.ttft, self.itl, self.e2e,
                       self.request_prompt, self.request_generation):
            metric.labels(model_name)

    def observe(self, stats: StepStats) -> None:
        m = self.model_name
        if stats.prompt_tokens:
            self.prompt_tokens.labels(m).inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self.generation_tokens.labels(m).inc(stats.generation_tokens)
        if stats.prefix_cache_queries:
            self.prefix_cache_queries.labels(m).inc(stats.prefix_cache_queries)
        if stats.prefix_cache_hits:
            self.prefix_cache_hits.labels(m).inc(stats.prefix_cache_hits)
        for value in stats.time_to_first_token:
            self.ttft.labels(m).observe(value)
        for value in stats.inter_token_latency:
            self.itl.labels(m).observe(value)
        for req in stats.finished:
            self.e2e.labels(m).observe(req.e2e_latency)
            self.request_prompt.labels(m).observe(req.prompt_tokens)
            self.request_generation.labels(m).observe(req.generation_tokens)
            if not req.failed:
                self.success.labels(m, req.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def build_metrics(engine: Any, model_name: str, max_model_len: int, adapters_loaded: Callable[[], int],
                  http_requests: Callable[[], dict[tuple[str, int], int]]) -> ServerMetrics:
    """The app's metrics, attached to ``engine`` as a stats observer."""
    metrics = ServerMetrics(engine, model_name, max_model_len, adapters_loaded, http_requests)
    engine.add_stats_observer(metrics.observe)
    return metrics
