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
""")


def _run(tmp_path, env_extra=None) -> subprocess.CompletedProcess:
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": REPO,
           **(env_extra or {})}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_module_level_tp_script_runs_with_fork(tmp_path):
    proc = _run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RESULT ['hello', 'WORLD']" in proc.stdout, out
    assert "started 1 worker process(es) by fork (no CUDA context exists in this process yet)" in out, out


def test_spawn_is_refused_with_the_reason(tmp_path):
    """Forced spawn re-imports the unguarded script in the worker: the error says why and what to do."""
    proc = _run(tmp_path, {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "RESULT" not in proc.stdout, out
    assert "by spawn (VLLM_WORKER_MULTIPROC_METHOD)" in out and 'if __name__ == "__main__":' in out, out


def test_start_method_rule(monkeypatch):
    import torch

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert start_method()[0] == "fork"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert start_method() == ("spawn", "CUDA is already initialised in this process, and a forked worker could "
                                       "not use it")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    assert start_method() == ("fork", "VLLM_WORKER_MULTIPROC_METHOD")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "forkserver")
    with pytest.raises(ValueError, match="VLLM_WORKER_MULTIPROC_METHOD"):
        start_method()
