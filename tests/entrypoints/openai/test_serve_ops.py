"""``vllm serve`` as an operator sees it: start-up errors, the port, logs, disconnects, SIGTERM."""
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import MODEL, REPO, SERVE_ARGS, Server, sample

GREEDY = dict(temperature=0, max_tokens=16)
# 512 sequences of 58 tokens, 4 at a time: tens of seconds of work on a CPU
LONG = {"model": "demo", "prompt": ["hello=", "world=", "abc=", "lora="], "n": 128, "max_tokens": 58,
        "ignore_eos": True, "temperature": 0}
LONG_ARGS = ["--max-num-seqs", "4"]
LONG_STREAM = {**LONG, "prompt": "hello=", "stream": True}  # its first chunk comes at once


def _serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli", "serve", model, "--host", "127.0.0.1",
            "--port", str(port), *SERVE_ARGS, *extra]


def _run_to_exit(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout


def _metric(server: Server, name: str) -> float:
    return sample(server.url, f"vllm:{name}")


@pytest.mark.parametrize("case", ["rank", "adapter_path", "model_folder"])
def test_startup_error_is_one_line_and_exit_1(case, tmp_path):
    from .conftest import free_port

    model, extra = MODEL, []
    if case == "rank":  # the shipped adapters have r=4
        extra = ["--max-lora-rank", "2"]
    elif case == "adapter_path":
        extra = ["--lora-modules", f"broken={tmp_path / 'no-such-adapter'}"]
    else:
        model = str(tmp_path / "no-such-model")
    rc, out = _run_to_exit(_serve_cmd(model, free_port(), *extra))
    assert rc == 1, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, out
    expected = {"rank": "max_lora_rank", "adapter_path": "no-such-adapter", "model_folder": "no-such-model"}[case]
    assert expected in errors[0]
    assert "] ready: " not in out


def test_taken_port_exits_1_without_saying_ready():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        rc, out = _run_to_exit(_serve_cmd(MODEL, port))
    assert rc == 1, out
    assert "] ready: " not in out and "Traceback" not in out, out
    assert any(line.startswith("ERROR") and str(port) in line for line in out.splitlines()), out


def _request_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"request cmpl-\S+: ", line)]


def _stats_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "tokens/s" in line]


def test_request_and_stats_log_lines():
    import httpx

    srv = Server(env={"VLLM_LOG_STATS_INTERVAL": "0.3"})
    try:
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "hello=", **GREEDY,
                                                          "max_tokens": 12}, timeout=30)
        assert r.status_code == 200
        body = {**LONG, "prompt": ["world="], "n": 64, "max_tokens": 40}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).status_code == 200
        time.sleep(1.0)  # idle: no stats line from here on
        log = srv.read_log()
        time.sleep(1.0)
        later = srv.read_log()
    finally:
        srv.stop()
    lines = _request_lines(log)
    assert len(lines) == 2, log
    assert "adapter upper" in lines[0] and "6 prompt tokens" in lines[0] and "max_tokens=12" in lines[0]
    assert "temperature=0" in lines[0]
    assert "hello" not in log and "world" not in log  # no prompt text unless asked
    stats = _stats_lines(log)
    assert stats, log
    assert all(re.search(r"running.*waiting.*KV cache [\d.]+% used", s) for s in stats)
    assert any(not re.search(r"generation 0\.0 tokens/s", s) for s in stats)
    assert _stats_lines(later) == stats  # nothing while idle
    # each start-up line once
    assert len(re.findall("using MoE backend", log)) == 1, log
    assert len(re.findall("KV cache: ", log)) == 1, log


def test_max_log_len_and_disabled_lines():
    import httpx

    srv = Server(["--max-log-len", "3", "--disable-log-stats"], env={"VLLM_LOG_STATS_INTERVAL": "0.2"})
    try:
        body = {"model": "demo", "prompt": "hello=", "n": 32, "max_tokens": 40, "ignore_eos": True, "temperature": 0}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30).status_code == 200
        time.sleep(0.5)
        log = srv.read_log()
    finally:
        srv.stop()
    lines = _request_lines(log)
    assert len(lines) == 1 and "'hel'" in lines[0] and "hello" not in lines[0], log
    assert not _stats_lines(log), log

    srv = Server(["--disable-log-requests"])
    try:
        assert httpx.post(f"{srv.url}/v1/completions", json={"model": "demo", "prompt": "hello=", **GREEDY},
                          timeout=30).status_code == 200
        log = srv.read_log()
    finally:
        srv.stop()
    assert not _request_lines(log), log
    assert "WARNING" in log and "--disable-log-requests is deprecated" in log, log  # accepted, as vLLM, with a warning


def test_non_streamed_request_is_aborted_when_the_client_leaves():
    import httpx

    srv = Server(LONG_ARGS)
    try:
        before = _metric(srv, "request_aborted_total")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=1.5))
        left = time.monotonic()
        while _metric(srv, "request_aborted_total") <= before and time.monotonic() - left < 5:
            time.sleep(0.1)
        assert _metric(srv, "request_aborted_total") > before, srv.read_log()
        assert time.monotonic() - left < 5
        # streams are still aborted too
        before = _metric(srv, "request_aborted_total")
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=LONG_STREAM, timeout=30) as r:
            next(r.iter_lines())
        left = time.monotonic()
        while _metric(srv, "request_aborted_total") <= before and time.monotonic() - left < 5:
            time.sleep(0.1)
        assert _metric(srv, "request_aborted_total") > before
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "hello=", **GREEDY}, timeout=30)
        assert r.json()["choices"][0]["text"] == "HELLO"
    finally:
        srv.stop()


def test_sigterm_drains_then_aborts_a_client_that_stopped_reading():
    import httpx

    srv = Server([*LONG_ARGS, "--shutdown-timeout", "2"])
    try:
        # a finished request's answer is not lost, then a stream whose client stops reading
        ok = httpx.post(f"{srv.url}/v1/completions", json={"model": "upper", "prompt": "hello=", **GREEDY}, timeout=30)
        assert ok.json()["choices"][0]["text"] == "HELLO"
        sock = socket.create_connection(("127.0.0.1", srv.port))
        body = httpx.Request("POST", f"{srv.url}/v1/completions", json=LONG_STREAM)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body.content)}\r\n\r\n").encode()
        sock.sendall(head + body.content)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")  # then never read again
        time.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            rc = srv.proc.wait(2 + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not stop within the drain timeout + 15 s:\n{srv.read_log()}")
        waited = time.monotonic() - t0
        sock.close()
        log = srv.read_log()
    finally:
        srv.stop()
    assert rc == 0, log
    assert waited >= 1.5, log  # it did wait for the stream first
    assert "aborting" in log
    assert log.rstrip().splitlines()[-1].endswith("server stopped"), log


def test_sigterm_lets_requests_in_flight_finish():
    import httpx

    srv = Server(["--shutdown-timeout", "20"])
    result = {}

    def call():
        body = {"model": "demo", "prompt": ["hello=", "world="], "n": 64, "max_tokens": 50, "ignore_eos": True,
                "temperature": 0}
        result["r"] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)

    try:
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(60)
        rc = srv.proc.wait(30)
        log = srv.read_log()
    finally:
        srv.stop()
    assert rc == 0, log
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["choices"]) == 128
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    assert log.rstrip().splitlines()[-1].endswith("server stopped")


def test_sigterm_shuts_tensor_parallel_workers_down():
    srv = Server(["--tensor-parallel-size", "2"])
    try:
        out = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
        assert children, "no worker process"
        srv.proc.send_signal(signal.SIGTERM)
        rc = srv.proc.wait(30)
        log = srv.read_log()
    finally:
        srv.stop()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in children)
    assert rc == 0 and log.rstrip().splitlines()[-1].endswith("server stopped"), log
