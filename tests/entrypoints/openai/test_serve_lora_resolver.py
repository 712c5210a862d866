"""On-demand adapters (vLLM's lora_filesystem_resolver) on the real ``vllm serve``: an unknown
``model`` name is loaded from the resolver directory on first use, when its adapter_config.json
names the served base model; names that escape the directory (``..``, symlinks, absolute paths)
and adapters of another base model stay unknown (404)."""
import json
import os
import shutil

import pytest

from .conftest import ADAPTERS, EXAMPLES, MODEL, Server

GREEDY = dict(temperature=0, max_tokens=8)


def _copy_adapter(src: str, dst: str, base=None) -> None:
    shutil.copytree(src, dst)
    if base is not None:
        path = os.path.join(dst, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = base
        with open(path, "w") as f:
            json.dump(config, f)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """DIR/{up2, org/rot2 (base given as the model's absolute path), other (another base model),
    link -> an adapter outside DIR}; an adapter outside DIR at ../outside/up3."""
    root = tmp_path_factory.mktemp("resolver")
    cache = root / "cache"
    cache.mkdir()
    _copy_adapter(ADAPTERS["upper"], str(cache / "up2"))  # base "examples/demo_model", relative to the server's cwd
    (cache / "org").mkdir()
    _copy_adapter(ADAPTERS["rot13"], str(cache / "org" / "rot2"), base=MODEL)
    _copy_adapter(ADAPTERS["upper"], str(cache / "other"), base="Qwen/Qwen3-30B-A3B")
    _copy_adapter(ADAPTERS["upper"], str(root / "outside" / "up3"))
    os.symlink(root / "outside" / "up3", cache / "link")
    return cache


def _complete(srv, model: str):
    import httpx

    return httpx.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": "hello=", **GREEDY}, timeout=30)


def _run_checks(srv) -> None:
    import httpx

    r = _complete(srv, "up2")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "HELLO", r.text
    r = _complete(srv, "org/rot2")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "uryyb", r.text
    ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models", timeout=5).json()["data"]]
    assert "up2" in ids and "org/rot2" in ids
    for name in ("other", "link", "../outside/up3", "org/../../outside/up3", "nothing", "org",
                 str(srv.cache / "up2"), ""):
        r = _complete(srv, name) if name else None
        if r is not None:
            assert r.status_code == 404, (name, r.text)
            assert r.json()["error"]["param"] == "model" and "does not exist" in r.json()["error"]["message"]
    assert _complete(srv, "up2").json()["choices"][0]["text"] == "HELLO"  # still served
    log = srv.read_log()
    assert log.count("LoRA resolver: loaded adapter up2") == 1, log  # loaded once


def test_flag_loads_adapters_on_first_use_and_confines_names(cache):
    srv = Server(["--lora-resolver-dir", str(cache)], base_args=["--enable-lora", "--max-lora-rank", "16",
                                                                  "--max-model-len", "64"])
    srv.cache = cache
    try:
        _run_checks(srv)
    finally:
        srv.stop()


def test_vllm_environment_variables_turn_it_on(cache):
    env = {"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    srv = Server(env=env, base_args=["--enable-lora", "--max-lora-rank", "16", "--max-model-len", "64"])
    srv.cache = cache
    try:
        _run_checks(srv)
    finally:
        srv.stop()


@pytest.mark.parametrize("env,args,words", [
    ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, ["--enable-lora"], "VLLM_LORA_RESOLVER_CACHE_DIR is not set"),
    ({"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": EXAMPLES}, ["--enable-lora"],
     "needs VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    ({}, ["--lora-resolver-dir", os.path.join(EXAMPLES, "nowhere"), "--enable-lora"], "is not a directory"),
    ({}, ["--lora-resolver-dir", EXAMPLES], "needs --enable-lora"),
])
def test_half_configured_resolver_is_a_start_up_error(env, args, words):
    with pytest.raises(RuntimeError) as e:
        Server(args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "", **env}, base_args=["--max-model-len", "64"])
    assert "exited with 1" in str(e.value) and words in str(e.value), e.value
