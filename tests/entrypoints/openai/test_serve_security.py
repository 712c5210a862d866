"""What a client may reach: the API key, body size, adapter-name races and adapter-path confinement."""
import asyncio
import getpass
import os
import shutil
import socket
import time

import pytest

from .conftest import ADAPTERS, REPO, Server

GREEDY = dict(temperature=0, max_tokens=16)


# ---- the adapter path policy, without a server ------------------------------------------------
def make_tree(root):
    """root/allowed/{up (adapter), link -> root/outside/up2, empty/}, root/outside/up2 (adapter)."""
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    shutil.copytree(ADAPTERS["upper"], allowed / "up")
    shutil.copytree(ADAPTERS["upper"], outside / "up2")
    os.symlink(outside / "up2", allowed / "link")
    (allowed / "empty").mkdir()
    return allowed, outside


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path)


def escapes(allowed, outside) -> list[str]:
    return [str(outside / "up2"), f"{allowed}/../outside/up2", str(allowed / "link"), "../outside/up2",
            f"~{getpass.getuser()}/x", "~/x", str(allowed / "empty"), str(allowed / "missing"), "/etc",
            os.path.relpath(ADAPTERS["upper"], REPO), "link/../../outside/up2", "up\x00"]


def test_policy_confines_paths(tree):
    from vllm.entrypoints.openai.security import AdapterPathError, AdapterPathPolicy

    allowed, outside = tree
    policy = AdapterPathPolicy([str(allowed)])
    real = os.path.realpath(allowed / "up")
    assert policy.resolve("up") == real
    assert policy.resolve(str(allowed / "up")) == real
    assert policy.resolve(f"{allowed}/empty/../up") == real
    messages = set()
    for path in escapes(allowed, outside):
        with pytest.raises(AdapterPathError) as e:
            policy.resolve(path)
        messages.add(str(e.value).replace(repr(path), "<path>"))
    assert len(messages) == 1, messages  # one message whatever the reason
    assert str(allowed.parent) not in messages.pop()


def test_policy_defaults_and_none(tree):
    from vllm.entrypoints.openai.security import AdapterPathError, AdapterPathPolicy

    allowed, _ = tree
    policy = AdapterPathPolicy.for_server(None, [str(allowed / "up")])
    assert policy.allowed_dirs == [os.path.realpath(allowed)]
    with pytest.raises(AdapterPathError, match="--lora-allowed-dirs"):
        AdapterPathPolicy.for_server(None, []).resolve(str(allowed / "up"))
    with pytest.raises(ValueError, match="--lora-allowed-dirs"):
        AdapterPathPolicy.for_server([str(allowed / "nope")], [])


def test_api_key_is_compared_in_constant_time(monkeypatch):
    import hmac

    import httpx
    from fastapi import FastAPI

    from vllm.entrypoints.openai import security
    from vllm.entrypoints.openai.http_middleware import ServerMiddleware, ServerState

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    app = FastAPI()
    for route in ("/v1/models", "/health", "/metrics", "/version"):
        app.get(route)(lambda: {"ok": True})
    app.add_middleware(ServerMiddleware, state=ServerState(), api_key="sekret")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            wrong = await c.get("/v1/models", headers={"Authorization": "Bearer sekreX"})
            right = await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
            none = await c.get("/v1/models")
            open_ = [(await c.get(p)).status_code for p in ("/health", "/metrics", "/version")]
            return wrong, right, none, open_

    wrong, right, none, open_ = asyncio.run(main())
    assert (wrong.status_code, right.status_code, none.status_code) == (401, 200, 401)
    assert wrong.json()["error"]["code"] == 401
    assert open_ == [200, 200, 200]
    assert len(calls) >= 2 and all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in calls)


# ---- a real server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def confined(tmp_path_factory):
    allowed, outside = make_tree(tmp_path_factory.mktemp("adapters"))
    srv = Server(["--lora-allowed-dirs", str(allowed), "--max-request-body-bytes", "4000", "--api-key", "k"],
                 env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    yield srv, allowed, outside
    srv.stop()


AUTH = {"Authorization": "Bearer k"}


def _post(srv, path, body, **kw):
    import httpx

    return httpx.post(f"{srv.url}{path}", json=body, headers=AUTH, timeout=30, **kw)


def test_runtime_loads_are_confined(confined):
    srv, allowed, outside = confined
    r = _post(srv, "/v1/load_lora_adapter", {"lora_name": "rel", "lora_path": "up"})
    assert r.status_code == 200, r.text
    out = _post(srv, "/v1/completions", {"model": "rel", "prompt": "hello=", **GREEDY}).json()
    assert out["choices"][0]["text"] == "HELLO"
    messages = set()
    for i, path in enumerate(escapes(allowed, outside)):
        r = _post(srv, "/v1/load_lora_adapter", {"lora_name": f"x{i}", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
        msg = r.json()["error"]["message"]
        messages.add(msg.replace(repr(path), "<path>").replace(f"x{i}", "<name>"))
        assert str(allowed.parent) not in msg.replace(path, "") and REPO not in msg
    assert len(messages) == 1, messages
    import httpx

    listing = httpx.get(f"{srv.url}/v1/models", headers=AUTH, timeout=5).text
    assert "rel" in listing and str(allowed) not in listing and REPO not in listing and '"/' not in listing


def test_concurrent_loads_of_one_name(confined):
    import httpx

    srv, allowed, _ = confined

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as c:
            body = {"lora_name": "same", "lora_path": str(allowed / "up")}
            return await asyncio.gather(*[c.post("/v1/load_lora_adapter", json=body) for _ in range(6)])

    codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes == [200] + [400] * 5, codes


def test_body_size_limit(confined):
    import httpx

    srv, _, _ = confined
    big = {"model": "demo", "prompt": "x" * 5000, **GREEDY}
    r = _post(srv, "/v1/completions", big)  # Content-Length over the limit
    assert r.status_code == 413 and r.json()["error"]["code"] == 413, r.text
    assert "4000" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(f"{srv.url}/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text
    # a huge declared body is refused before it is sent
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        t0 = time.monotonic()
        assert s.recv(64).startswith(b"HTTP/1.1 413")
        assert time.monotonic() - t0 < 5
    ok = _post(srv, "/v1/completions", {"model": "demo", "prompt": "hello=", **GREEDY})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "hello"


def test_open_routes_with_an_api_key(confined):
    import httpx

    srv, _, _ = confined
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{srv.url}{path}", timeout=5).status_code == 200, path
    assert httpx.get(f"{srv.url}/v1/models", timeout=5).status_code == 401
