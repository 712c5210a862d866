"""Fuzz the real ``vllm serve`` with thousands of generated requests (the suite runs a few hundred).

Starts the demo server (runtime adapter updates on, a small body limit), sends the requests that once
killed the engine or got a 5xx (``KNOWN_FINDINGS``), then ``--requests`` requests drawn by tests/entrypoints/openai/fuzz_requests.py (every field valid or hostile: huge integers,
non-finite numbers, wrong types, lone surrogates, out-of-vocabulary token ids, nested junk, unknown
and unsupported fields, bodies that are not JSON or too large, adapter paths that escape), and after
every ``--good-every`` of them a good greedy request whose answer must equal the offline engine's.
Prints a table of answers by route and status; exits 1 on any 5xx, broken connection, non-OpenAI
error body, wrong good answer, or an unhealthy server at the end.

    python benchmarks/fuzz_server.py [--requests 2500] [--good-every 10] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BODY_LIMIT = 64 * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2500)
    p.add_argument("--good-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args()

    import httpx
    from hypothesis import HealthCheck, example, given, seed, settings

    from tests.entrypoints.openai.conftest import ADAPTERS, MODEL, Server
    from tests.entrypoints.openai.fuzz_requests import KNOWN_FINDINGS, FuzzRequest, any_request, check_answer
    from tests.entrypoints.openai.test_fuzz_server import good_answer, send
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64)
    words = ["hello", "world", "abc", "lora", "fuzz"]
    loras = {"demo": None, "upper": LoRARequest("upper", 1, ADAPTERS["upper"]),
             "rot13": LoRARequest("rot13", 2, ADAPTERS["rot13"])}
    rows = [(m, w) for m in loras for w in words]
    outs = llm.generate([f"{w}=" for _, w in rows], SamplingParams(temperature=0, max_tokens=16),
                        lora_request=[loras[m] for m, _ in rows], use_tqdm=False)
    expected = {row: o.outputs[0].text for row, o in zip(rows, outs)}
    del llm

    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    good = {"sent": 0, "ok": 0}
    srv = Server(["--max-request-body-bytes", str(BODY_LIMIT)], env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    t0 = time.perf_counter()
    try:
        with httpx.Client(base_url=srv.url, timeout=60.0) as http:
            n = {"sent": 0}

            @seed(args.seed)
            @settings(max_examples=args.requests, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(any_request(huge_body_bytes=BODY_LIMIT + 1))
            def fuzz(req: FuzzRequest) -> None:
                status, text = send(http, req)
                counts[(req.path, status)] += 1
                problem = check_answer(req, status, text)
                if problem:
                    problems.append(problem)
                n["sent"] += 1
                if n["sent"] % args.good_every == 0:
                    model, word = rows[(n["sent"] // args.good_every) % len(rows)]
                    good["sent"] += 1
                    try:
                        answer = good_answer(http, model, word)
                    except AssertionError as e:
                        answer = f"failed: {e}"
                    if answer == expected[(model, word)]:
                        good["ok"] += 1
                    else:
                        problems.append(f"good request {model}/{word} -> {answer!r}")

            for known in reversed(KNOWN_FINDINGS):  # the findings first, then the generated ones
                fuzz = example(known)(fuzz)
            fuzz()
            healthy = http.get("/health").status_code == 200
            metrics = http.get("/metrics").text
    finally:
        srv.stop()
    seconds = time.perf_counter() - t0
    lines = [f"{sum(counts.values())} generated requests + {good['sent']} good ones in {seconds:.0f} s "
             f"(seed {args.seed}); good answers correct: {good['ok']}/{good['sent']}; healthy at the end: {healthy}",
             "", "| route | status | requests |", "|---|---:|---:|"]
    lines += [f"| {path} | {status} | {c} |" for (path, status), c in sorted(counts.items())]
    running = [ln for ln in metrics.splitlines() if ln.startswith(("vllm:num_requests_running",
                                                                    "vllm:num_requests_waiting"))]
    lines += ["", "gauges at the end: " + "; ".join(running)]
    if problems:
        lines += ["", f"{len(problems)} problems:"] + [f"- {x}" for x in problems[:30]]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if (not problems and healthy) else 1


if __name__ == "__main__":
    sys.exit(main())
