"""A short soak of the real server (``benchmarks/soak_server.py`` runs the long one): concurrent
streamed and plain requests over the base model and four adapters, random client disconnects, and
adapters loaded and unloaded while requests use them. Nothing is lost, every answer is exact, the
gauges and the KV cache drain to zero, and memory stays flat (see soak.py for the rules)."""
import asyncio

from .conftest import ADAPTERS, Server
from .soak import Soak, expected_answers, problems

SECONDS = 25
EXTRA = ["--lora-modules", f"upper_b={ADAPTERS['upper']}", f"rot13_b={ADAPTERS['rot13']}"]


def test_short_soak():
    from .conftest import MODEL

    expected = expected_answers(MODEL, ADAPTERS)
    srv = Server(EXTRA, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        soak = Soak(srv.url, expected, ADAPTERS, srv.proc.pid, seconds=SECONDS, concurrency=16, seed=1)
        report = asyncio.run(soak.run())
    finally:
        srv.stop()
    found = problems(report, min_requests=150)
    assert not found, "\n".join(found) + f"\noutcomes: {dict(report.outcomes)}; admin: {dict(report.admin)}"
    assert report.admin["unload 200"] >= 2 and report.admin["load 200"] >= 2, report.admin
    assert any("dropped" in k for k in report.outcomes) and any("404" in k for k in report.outcomes), report.outcomes
