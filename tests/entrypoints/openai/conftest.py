"""Start the real ``vllm serve`` in a subprocess on 127.0.0.1 (demo model, two adapters)."""
import importlib
import os
import socket
import subprocess
import sys
import time
from types import ModuleType
from typing import Mapping, Optional

import pytest


def in_ci(environ: Mapping[str, str]) -> bool:
    """``CI`` is set to something other than an empty / false value (CI services set CI=true)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require(module: str, environ: Optional[Mapping[str, str]] = None) -> ModuleType:
    """Import a test dependency of the server tests. Without it they are skipped on a developer's
    machine, but in CI a missing dependency fails the run loudly: tests must not vanish there.
    (An installed package that fails to import raises its own error everywhere.)"""
    environ = os.environ if environ is None else environ
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        fix = 'pip install -e ".[test]"'
        if in_ci(environ):
            raise ImportError(f"the server tests need the package {module!r}, which is not installed ({exc}); "
                              f"in CI (CI={environ.get('CI')!r}) they must run, not be skipped: {fix}") from exc
        pytest.skip(f"{module} is not installed, so the server tests are skipped ({fix} installs it)",
                    allow_module_level=True)


require("fastapi")
require("uvicorn")
httpx = require("httpx")
require("openai")
require("prometheus_client")

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "examples")
MODEL = os.path.join(EXAMPLES, "demo_model")
ADAPTERS = {"upper": os.path.join(EXAMPLES, "demo_adapters", "upper"),
            "rot13": os.path.join(EXAMPLES, "demo_adapters", "rot13")}
SERVE_ARGS = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-model-len", "64",
              "--lora-modules"] + [f"{n}={p}" for n, p in ADAPTERS.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, dict[frozenset, float]]:
    """``/metrics`` parsed with prometheus_client's parser: {sample name: {frozenset(labels): value}}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def sample(url: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (model_name="demo" unless given)."""
    labels.setdefault("model_name", "demo")
    rows = [v for k, v in scrape(url).get(name, {}).items() if set(labels.items()) <= k]
    assert len(rows) == 1, (name, labels, rows)
    return rows[0]


class Server:
    def __init__(self, extra_args=(), env=None, timeout: float = 60.0, model: str = MODEL) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", "demo", *SERVE_ARGS, *extra_args]
        self.log_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-serve-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy within {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="session")
def server():
    srv = Server(env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=30.0, max_retries=0)


@pytest.fixture(scope="session")
def expected():
    """Greedy outputs of the offline LLM for the test prompts: {(model, word): text}."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(MODEL, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64)
    loras = {"demo": None, "upper": LoRARequest("upper", 1, ADAPTERS["upper"]),
             "rot13": LoRARequest("rot13", 2, ADAPTERS["rot13"])}
    words = ["hello", "world", "abc", "vllm", "lora"]
    rows = [(m, w) for m in loras for w in words]
    outs = llm.generate([f"{w}=" for _, w in rows], SamplingParams(temperature=0, max_tokens=16),
                        lora_request=[loras[m] for m, _ in rows], use_tqdm=False)
    return {row: o.outputs[0].text for row, o in zip(rows, outs)}
