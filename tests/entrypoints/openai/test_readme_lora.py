"""The README's "vLLM LoRA workflow" blocks run as written (vLLM's LoRA guide adapted to the demo
model): the launch command, the curl commands, the openai client snippet and the offline snippet.
Only the port (8000) is replaced by a free one, and ``vllm`` is this checkout's CLI."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, free_port, httpx, in_ci

SECTION = "### The vLLM LoRA workflow"


def _blocks() -> list[tuple[str, str]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n#", start + len(SECTION))
    return re.findall(r"```(bash|python)\n(.*?)```", text[start:end], re.S)


@pytest.fixture(scope="module")
def blocks():
    found = _blocks()
    assert [kind for kind, _ in found] == ["bash", "bash", "python", "python"], found
    return [code for _, code in found]


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def server(blocks, port):
    """The first block, with ``vllm`` run from this checkout (``exec``: the shell becomes the server)."""
    launch = blocks[0].replace("8000", str(port)).replace("vllm serve", f"exec {sys.executable} -m "
                                                                         "vllm.entrypoints.cli serve")
    if "--port" not in launch:
        launch = launch.rstrip() + f" --port {port}\n"
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"readme-lora-{port}.log"), "w")
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # the block sets it
    proc = subprocess.Popen(["bash", "-c", launch], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log.name).read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()


def test_curl_sequence(blocks, port, server):
    if shutil.which("curl") is None:
        if in_ci(os.environ):
            raise AssertionError("curl is needed to run the README's commands")
        pytest.skip("curl is not installed")
    script = "set -e\n" + "\n".join(f"echo; {line}" if line.startswith("curl") else line
                                   for line in blocks[1].replace("8000", str(port)).splitlines())
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    models, upper, loaded, shout, unloaded = [x.strip() for x in out.stdout.split("\n", 1)[1].split("\n")][:5]
    assert '"id":"upper"' in models and '"id":"rot13"' in models and '"parent":"examples/demo_model"' in models
    assert '"text":"HELLO"' in upper, upper
    assert "added successfully" in loaded and "removed successfully" in unloaded, (loaded, unloaded)
    assert '"text":"WORLD"' in shout, shout
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
    assert [m["id"] for m in r["data"]] == ["examples/demo_model", "upper", "rot13"]  # shout is gone


def test_openai_client_snippet(blocks, port, server):
    out = subprocess.run([sys.executable, "-c", blocks[2].replace("8000", str(port))], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['examples/demo_model', 'upper', 'rot13']", "uryyb"], out.stdout


def test_offline_snippet(blocks):
    out = subprocess.run([sys.executable, "-c", blocks[3]], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "HELLO", out.stdout
