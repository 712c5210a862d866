"""Soak the real ``vllm serve`` for minutes (the suite runs ~25 s): concurrent clients over the base
model and four adapters (two of them copies under other names, so max_loras=2 keeps swapping slots),
streamed and plain completions and chat, random client disconnects, and two adapters loaded and
unloaded at run time, also while requests use them. The rules (what counts as answered, refused,
dropped or lost) are in tests/entrypoints/openai/soak.py. Prints the outcome table, the final gauges
and the server's memory over time; exits 1 on any problem.

    python benchmarks/soak_server.py [--seconds 300] [--concurrency 32] [--out soak.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--disconnect-rate", type=float, default=0.15)
    p.add_argument("--min-requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from tests.entrypoints.openai.conftest import ADAPTERS, MODEL, Server
    from tests.entrypoints.openai.soak import Soak, expected_answers, problems
    from tests.entrypoints.openai.test_soak import EXTRA

    expected = expected_answers(MODEL, ADAPTERS)
    srv = Server(EXTRA, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    try:
        soak = Soak(srv.url, expected, ADAPTERS, srv.proc.pid, seconds=a.seconds, concurrency=a.concurrency,
                    disconnect_rate=a.disconnect_rate, seed=a.seed)
        report = asyncio.run(soak.run())
    finally:
        srv.stop()
    found = problems(report, min_requests=a.min_requests)
    rss = report.rss_mib
    lines = [f"{report.requests} requests in {report.seconds:.0f} s from {a.concurrency} concurrent clients "
             f"(seed {a.seed}); adapter loads/unloads: {dict(sorted(report.admin.items()))}", "",
             "| outcome | requests |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(report.outcomes.items())]
    lines += [f"| lost | {len(report.lost)} |", "",
              f"after the run: {report.final}",
              f"server memory (RSS, MiB, sampled every second): first {rss[:1]}, after 1/4 "
              f"{rss[len(rss) // 4:len(rss) // 4 + 1]}, max {max(rss, default=0):.0f}, last {rss[-1:]}", "",
              "problems: " + ("none" if not found else "\n- " + "\n- ".join(found))]
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
