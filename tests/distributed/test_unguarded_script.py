"""A script that builds ``LLM(..., tensor_parallel_size=2)`` at module level (no
``if __name__ == "__main__":`` guard) runs, as in vLLM: without a CUDA context the workers start by
fork, which does not re-import the script; the log says which start method was used and why.
Run in a subprocess on CPU (gloo) with the demo model; its outputs must equal the TP=1 ones."""
import os
import subprocess
import sys
import textwrap

import pytest

from vllm.executor.multiproc import start_method

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.path.join(REPO, "examples", "demo_model")

SCRIPT = textwrap.dedent(f"""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM({MODEL!r}, tensor_parallel_size=2, enable_lora=True, max_lora_rank=8, max_model_len=64)
    upper = LoRARequest("upper", 1, {os.path.join(REPO, "examples", "demo_adapters", "upper")!r})
    outs = llm.generate(["hello=", "world="], SamplingParams(temperature=0), lora_request=[None, upper],
                        use_tqdm=False)
    print("RESULT", [o.outputs[0].text for o in outs])
    if TWICE:  # a second engine while the first is garbage in a cycle (not shut down)
        cycle = [llm]
        cycle.append(cycle)
        del llm, cycle
        llm = LLM({MODEL!r}, tensor_parallel_size=2, max_model_len=64)
        print("AGAIN", llm.generate("hello=", SamplingParams(temperature=0), use_tqdm=False)[0].outputs[0].text)
""")


def _run(tmp_path, env_extra=None, twice=False) -> subprocess.CompletedProcess:
    script = tmp_path / "unguarded.py"
    script.write_text(f"TWICE = {twice}\n" + SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": REPO,
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)


def test_module_level_tp_script_runs_with_fork(tmp_path):
    proc = _run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RESULT ['hello', 'WORLD']" in proc.stdout, out
    assert "started 1 worker process(es) by fork (CPU workers)" in out, out


def test_a_second_engine_forks_cleanly_while_the_first_is_uncollected_garbage(tmp_path):
    """The workers of the second engine must not tear down the first one's TCP store (inherited by
    fork, its threads absent in the child): the parent collects and freezes its garbage before forking."""
    proc = _run(tmp_path, twice=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "AGAIN hello" in proc.stdout, out


def test_spawn_is_refused_with_the_reason(tmp_path):
    """Forced spawn re-imports the unguarded script in the worker: the error says why and what to do."""
    proc = _run(tmp_path, {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "RESULT" not in proc.stdout, out
    assert "by spawn (VLLM_WORKER_MULTIPROC_METHOD)" in out and 'if __name__ == "__main__":' in out, out


def test_start_method_rule(monkeypatch):
    import torch

    from vllm.executor import multiproc

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    assert start_method(on_cuda=False) == ("fork", "CPU workers")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(multiproc, "_forked_child_can_use_cuda", lambda: True)
    assert start_method(on_cuda=True)[0] == "fork"
    monkeypatch.setattr(multiproc, "_forked_child_can_use_cuda", lambda: False)
    assert start_method(on_cuda=True)[0] == "spawn" and "torch.cuda.is_available()" in start_method(True)[1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert start_method(on_cuda=True) == ("spawn", "CUDA is already initialised in this process, and a forked "
                                                   "worker could not use it")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    assert start_method(on_cuda=True) == ("fork", "VLLM_WORKER_MULTIPROC_METHOD")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "forkserver")
    with pytest.raises(ValueError, match="VLLM_WORKER_MULTIPROC_METHOD"):
        start_method(on_cuda=True)


def test_fork_probe_sees_torch_refusing_cuda_in_forked_children(monkeypatch):
    """The probe reports what torch would do in a forked child (here: the flag it sets after fork)."""
    import torch

    from vllm.executor.multiproc import _forked_child_can_use_cuda

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    assert _forked_child_can_use_cuda()
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    assert not _forked_child_can_use_cuda()


FORK_STORE = textwrap.dedent("""
    import gc, os, sys, threading, time
    import torch.distributed as dist
    from vllm.executor.multiproc import _fork_safe_objects

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # its server runs a thread
    cycle = [store]
    cycle.append(cycle)
    del store, cycle  # garbage until the next collection
    gc.disable()
    with _fork_safe_objects(True):
        pid = os.fork()
        if pid == 0:  # a worker: it starts threads of its own, then the collector runs
            for t in [threading.Thread(target=time.sleep, args=(2,), daemon=True) for _ in range(8)]:
                t.start()
            gc.enable()
            gc.collect()
            os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("CHILD STATUS", status)
            sys.exit(0)
        time.sleep(0.1)
    os.kill(pid, 9)
    print("CHILD HUNG")
""")


def test_forked_children_never_destroy_an_inherited_tcp_store(tmp_path):
    """Without the collect-and-freeze around the fork, the child's collector destroys the parent's
    store, whose destructor joins a thread that does not exist in the child: it aborts or hangs."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", FORK_STORE], env=env, capture_output=True, text=True, timeout=120)
    assert "CHILD STATUS 0" in proc.stdout, proc.stdout + proc.stderr
