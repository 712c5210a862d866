"""A soak of the real server: concurrent clients over the base model and four adapters, random
disconnects of streamed and non-streamed requests, and adapters loaded and unloaded at run time
(also while requests use them).

Every request must end in one of three ways, each checked:
- answered: the text equals the offline engine's greedy answer for its (model, word), finish "stop";
- refused with a 404 because its adapter was not loaded when it was sent, or was unloaded while it was
  on its way (the admin task knows which);
- dropped by the client on purpose (a disconnect).
Anything else (a 5xx, a broken connection the client did not cause, a wrong or short answer, a
timeout) is "lost". After the run the gauges drain to 0, the KV cache is empty, every adapter still
answers correctly, and the server's resident memory stayed flat.

Used by ``test_soak.py`` (about half a minute) and ``benchmarks/soak_server.py`` (5 minutes).
"""
from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

WORDS = ["hello", "world", "abc", "vllm", "lora", "soak", "moe"]
GREEDY = {"max_tokens": 16, "temperature": 0}
# model name -> the adapter whose weights it serves (None: the base model)
STATIC = {"demo": None, "upper": "upper", "rot13": "rot13", "upper_b": "upper", "rot13_b": "rot13"}
RUNTIME = {"extra_upper": "upper", "extra_rot13": "rot13"}  # loaded and unloaded during the run


@dataclass
class SoakReport:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    admin: collections.Counter = field(default_factory=collections.Counter)
    rss_mib: list[float] = field(default_factory=list)
    seconds: float = 0.0
    final: dict = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


def metric(text: str, name: str) -> Optional[float]:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, url: str, expected: dict, adapter_paths: dict[str, str], pid: int, *, seconds: float,
                 concurrency: int, disconnect_rate: float = 0.15, seed: int = 0) -> None:
        self.url, self.expected, self.paths, self.pid = url, expected, adapter_paths, pid
        self.seconds, self.concurrency, self.disconnect_rate = seconds, concurrency, disconnect_rate
        self.rng = random.Random(seed)
        self.report = SoakReport()
        self.loaded: set[str] = set()  # runtime adapters the server serves now
        self.unloaded_at: dict[str, float] = {}  # runtime adapter -> when its unload was acknowledged

    def want(self, model: str, word: str) -> str:
        base = STATIC.get(model, RUNTIME.get(model))
        return self.expected[(base or "demo", word)]

    # ---- clients ------------------------------------------------------------------------
    async def one(self, http: httpx.AsyncClient) -> None:
        rng = self.rng
        model = rng.choice(list(STATIC) + sorted(self.loaded | set(RUNTIME)))
        word, stream, chat = rng.choice(WORDS), rng.random() < 0.5, rng.random() < 0.25
        drop = rng.random() < self.disconnect_rate
        kind = ("chat" if chat else "cmpl") + ("-stream" if stream else "")
        sent_at = time.monotonic()
        was_loaded = model in self.loaded  # a 404 is right when it was not (a load may be in flight)
        if chat:
            path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": word}]}
        else:
            path, body = "/v1/completions", {"model": model, "prompt": f"{word}="}
        body.update(GREEDY, stream=stream)
        try:
            if drop:
                await self._dropped(http, path, body, stream)
                self.report.outcomes[f"{kind} dropped by the client"] += 1
                return
            status, text, finish = await self._send(http, path, body, stream, chat)
        except (httpx.HTTPError, asyncio.TimeoutError) as e:
            self.report.lost.append(f"{kind} {model}/{word}: {e!r}")
            return
        if status == 404 and model in RUNTIME and (not was_loaded or model not in self.loaded or
                                                   self.unloaded_at.get(model, 0) >= sent_at - 1):
            self.report.outcomes[f"{kind} 404 (adapter unloaded)"] += 1
            return
        base = STATIC.get(model, RUNTIME.get(model)) or "demo"
        want = self.expected[("chat", base, word)] if chat else self.want(model, word)
        if status != 200 or text != want or finish != "stop":
            self.report.lost.append(f"{kind} {model}/{word}: {status} {text!r} (want {want!r}) finish {finish}")
            return
        self.report.outcomes[f"{kind} answered correctly"] += 1

    async def _send(self, http, path, body, stream, chat) -> tuple[int, str, Optional[str]]:
        import json

        if not stream:
            r = await http.post(path, json=body)
            if r.status_code != 200:
                return r.status_code, r.text, None
            c = r.json()["choices"][0]
            return 200, (c["message"]["content"] if chat else c["text"]), c["finish_reason"]
        text, finish = "", None
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return r.status_code, (await r.aread()).decode(), None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    text += (c.get("delta", {}).get("content") or "") if chat else c.get("text", "")
                    finish = c.get("finish_reason") or finish
        return 200, text, finish

    async def _dropped(self, http, path, body, stream) -> None:
        """Send, then go away: after the first chunk of a stream, or after a short wait for a plain one."""
        if stream:
            async with http.stream("POST", path, json=body) as r:
                async for _ in r.aiter_lines():
                    break
            return
        try:
            await asyncio.wait_for(http.post(path, json=body), timeout=self.rng.uniform(0.005, 0.05))
        except asyncio.TimeoutError:
            pass

    async def client(self, http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.one(http), timeout=120)
            except asyncio.TimeoutError:
                self.report.lost.append("a request took over 120 s")

    # ---- admin and sampling ----------------------------------------------------------------
    async def admin(self, http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))
            name = self.rng.choice(sorted(RUNTIME))
            if name in self.loaded:
                self.loaded.discard(name)  # no new requests pick it from now on
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": name})
                self.unloaded_at[name] = time.monotonic()
                self.report.admin[f"unload {r.status_code}"] += 1
            else:
                r = await http.post("/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": self.paths[RUNTIME[name]]})
                if r.status_code == 200:
                    self.loaded.add(name)
                self.report.admin[f"load {r.status_code}"] += 1

    async def sample_memory(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.report.rss_mib.append(rss_mib(self.pid))
            await asyncio.sleep(1.0)

    async def run(self) -> SoakReport:
        start = time.monotonic()
        deadline = start + self.seconds
        limits = httpx.Limits(max_connections=self.concurrency + 8)
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0, limits=limits) as http:
            await asyncio.gather(self.admin(http, deadline), self.sample_memory(deadline),
                                 *[self.client(http, deadline) for _ in range(self.concurrency)])
            self.report.seconds = time.monotonic() - start
            self.report.final = await self.drained(http)
        return self.report

    async def drained(self, http: httpx.AsyncClient) -> dict:
        """Gauges and KV usage once the last request is gone (polled up to 10 s), then every model's answer."""
        final: dict = {}
        for _ in range(50):
            text = (await http.get("/metrics")).text
            final = {k: metric(text, f"vllm:{k}") for k in ("num_requests_running", "num_requests_waiting",
                                                             "kv_cache_usage_perc")}
            if not any(final.values()):
                break
            await asyncio.sleep(0.2)
        final["healthy"] = (await http.get("/health")).status_code == 200
        wrong = []
        for model in STATIC:
            for word in WORDS[:2]:
                r = await http.post("/v1/completions", json={"model": model, "prompt": f"{word}=", **GREEDY})
                got = r.json()["choices"][0]["text"] if r.status_code == 200 else f"{r.status_code}"
                if got != self.want(model, word):
                    wrong.append(f"{model}/{word}: {got!r}")
        final["wrong_after"] = wrong
        return final


def expected_answers(model_dir: str, adapter_paths: dict[str, str]) -> dict:
    """Greedy answers of the offline engine: {(adapter or "demo", word): text} and
    {("chat", adapter or "demo", word): text}."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model_dir, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64)
    loras = {"demo": None, "upper": LoRARequest("upper", 1, adapter_paths["upper"]),
             "rot13": LoRARequest("rot13", 2, adapter_paths["rot13"])}
    params = SamplingParams(**GREEDY)
    rows = [(m, w) for m in loras for w in WORDS]
    outs = llm.generate([f"{w}=" for _, w in rows], params, lora_request=[loras[m] for m, _ in rows], use_tqdm=False)
    expected = {row: o.outputs[0].text for row, o in zip(rows, outs)}
    for m, w in rows:
        out = llm.chat([{"role": "user", "content": w}], params, lora_request=loras[m], use_tqdm=False)
        expected[("chat", m, w)] = out[0].outputs[0].text
    llm.llm_engine.shutdown()
    return expected


def problems(report: SoakReport, *, min_requests: int) -> list[str]:
    """What the soak's report says went wrong (empty: nothing)."""
    out = [f"lost: {x}" for x in report.lost[:20]]
    if report.requests < min_requests:
        out.append(f"only {report.requests} requests ran (want >= {min_requests})")
    f = report.final
    if any(f.get(k) for k in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")):
        out.append(f"not drained: {f}")
    if not f.get("healthy"):
        out.append("unhealthy at the end")
    out += [f"wrong after the soak: {x}" for x in f.get("wrong_after", [])]
    rss = report.rss_mib
    if len(rss) >= 8:
        q = len(rss) // 4
        early, late = sum(rss[q:2 * q]) / q, sum(rss[-q:]) / q
        if late > early * 1.10 + 50:
            out.append(f"memory grew: {early:.0f} MiB -> {late:.0f} MiB")
    return out
