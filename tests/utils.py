"""The one tolerance helper for numeric tests, and small shared test tools.

``assert_close`` compares with two normalised errors (as OpenAI's triton_kernels
tests do): the max absolute error over the max absolute reference value, and
the RMS error over the RMS of the reference.  Bounds depend on the dtype the
kernel computed in.  Any test that needs other bounds says why in a comment.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

# (max normalised error, rms normalised error) per compute dtype.  fp32 allows
# tf32 tensor-core products (Triton's default for fp32 dots on GPU).
_BOUNDS = {
    torch.float32: (2e-3, 5e-4),
    torch.float16: (6e-3, 1.5e-3),
    torch.bfloat16: (3e-2, 8e-3),
}


# On a GPU, Triton's fp32 dots run as tf32 (10-bit mantissa): both GEMMs and the LoRA
# expand round their operands to tf32 (measured rms error 2.0-2.6e-3 on an H200).
_FP32_ON_CUDA = (1e-2, 4e-3)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.float32 and torch.cuda.is_available():
        return _FP32_ON_CUDA
    return _BOUNDS[dtype]


def normalized_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - e).abs()
    scale_max = e.abs().max().clamp_min(1e-12)
    scale_rms = e.pow(2).mean().sqrt().clamp_min(1e-12)
    return float(diff.max() / scale_max), float(diff.pow(2).mean().sqrt() / scale_rms)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    *,
    bounds: Optional[tuple[float, float]] = None,
    name: str = "output",
) -> None:
    """Assert ``actual`` matches ``expected`` within the bounds of ``dtype``.

    ``dtype`` defaults to ``actual.dtype``; NaN or Inf in ``actual`` never passes.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output or overflow)"
    max_b, rms_b = bounds or tolerance(dtype or actual.dtype)
    max_e, rms_e = normalized_errors(actual, expected)
    assert max_e <= max_b and rms_e <= rms_b, (
        f"{name}: normalised max error {max_e:.3g} (bound {max_b:.3g}), rms error {rms_e:.3g} (bound {rms_b:.3g})"
    )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a kernel's output before the kernel writes it: NaN for floats, a huge value for ints."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).max // 2 - 7)
    return t


def random_expert(num_experts: int, generator: Optional[torch.Generator] = None) -> int:
    """One expert id drawn at random (e.g. the one a test leaves without tokens)."""
    return int(torch.randint(num_experts, (1,), generator=generator))


def random_topk_ids(num_tokens: int, num_experts: int, top_k: int, *, empty: Sequence[int] = (),
                    cover: Optional[Sequence[int]] = None, cover_tokens: Optional[Sequence[int]] = None,
                    drop: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random routing, int32 [num_tokens, top_k], distinct experts per token.

    empty: experts that get no pair.  cover: experts that each get at least one pair (default:
    every expert not in ``empty``), as far as ``num_tokens * top_k`` allows: a random permutation
    of them fills the rows of ``cover_tokens`` (default: every token, in random order), top_k at a
    time, before anything else is random.  So a kernel that skips any one expert (the last one
    say) is seen.  drop: the fraction of the other pairs set to -1 (dropped).
    """
    allowed = torch.tensor([e for e in range(num_experts) if e not in set(empty)], dtype=torch.long)
    if top_k > allowed.numel():
        raise ValueError(f"top_k={top_k} needs {top_k} experts, only {allowed.numel()} are allowed")
    ids = allowed[torch.rand(num_tokens, allowed.numel(), generator=generator).argsort(dim=1)[:, :top_k]]
    must = [e for e in (allowed.tolist() if cover is None else cover) if e not in set(empty)]
    must = [must[i] for i in torch.randperm(len(must), generator=generator).tolist()]
    if cover_tokens is None:
        cover_tokens = torch.randperm(num_tokens, generator=generator).tolist()
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)  # pairs that carry the cover: never dropped
    for row, first in zip(cover_tokens, range(0, len(must), top_k)):
        chunk = must[first:first + top_k]
        rest = [e for e in ids[row].tolist() if e not in chunk]
        ids[row] = torch.tensor(chunk + rest[:top_k - len(chunk)])
        keep[row, :len(chunk)] = True
    if drop:
        ids[(torch.rand(num_tokens, top_k, generator=generator) < drop) & ~keep] = -1
    return ids.to(torch.int32)


def _proc_state(pid: int) -> Optional[tuple[str, int]]:
    """(state letter, parent pid) of a Linux process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger where nothing reaps it)."""
    state = _proc_state(pid)
    return state is not None and state[0] != "Z"


def child_processes(pid: int) -> list[int]:
    """Running (non-zombie) children of ``pid`` (Linux /proc)."""
    import os

    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            state = _proc_state(int(name))
            if state is not None and state[1] == pid and state[0] != "Z":
                out.append(int(name))
    return out


@contextlib.contextmanager
def patched(obj, name: str, make):
    """Replace ``obj.name`` by ``make(original)`` for the ``with`` block (fault injection in tests)."""
    original = getattr(obj, name)
    setattr(obj, name, make(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


class Injected(RuntimeError):
    """The exception the fault-injection helpers raise."""


@contextlib.contextmanager
def faulty_runner(runner, where: str, bad_launch, bad_execute):
    """Async scheduling fault injection for the ``with`` block: ``runner.launch`` raises
    ``Injected("queued step fault")`` for a batch where ``bad_launch(out, tokens_ahead)`` holds when ``where``
    is "launch", else its tokens raise ``Injected("device fault")`` when read; ``runner.execute`` raises
    ``Injected("step fault")`` where ``bad_execute(out)`` holds (the synchronous re-run pins it down)."""
    def make_launch(launch):
        def launch_with_fault(out, input_ids=None, tokens_ahead=0):
            bad = bad_launch(out, tokens_ahead)
            if bad and where == "launch":
                raise Injected("queued step fault")
            tokens = launch(out, input_ids=input_ids, tokens_ahead=tokens_ahead)
            if bad:
                def fail():
                    raise Injected("device fault")
                tokens.tolist = fail
            return tokens
        return launch_with_fault

    def make_execute(execute):
        def execute_with_fault(out):
            if bad_execute(out):
                raise Injected("step fault")
            return execute(out)
        return execute_with_fault

    with patched(runner, "launch", make_launch), patched(runner, "execute", make_execute):
        yield


def run_to_completion(engine, max_steps: int = 500) -> dict:
    """Step ``engine`` until it has no unfinished request; returns the final output of each request by id
    (fails after ``max_steps`` steps)."""
    done = {}
    for _ in range(max_steps):
        done.update({out.request_id: out for out in engine.step() if out.finished})
        if not engine.has_unfinished_requests():
            return done
    raise AssertionError("the engine did not finish")


def assert_clean_and_serving(llm, prompts: Sequence[str], params) -> None:
    """After a failure: ``llm``'s engine holds no request, error or KV block, and serves ``prompts`` with
    ``params`` exactly as ``llm.reference`` (prompt -> token ids) says."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine._requests and not engine._errors
    engine.scheduler.block_manager.check_no_leaks()
    outs = llm.generate(list(prompts), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [llm.reference[p] for p in prompts]


def run_without_interpreter(*args: str, timeout: int = 600) -> str:
    """Run ``python *args`` from the repository root without ``TRITON_INTERPRET`` (the sm_90 compile scripts:
    the interpreter never compiles; no GPU needed); skips the test without Triton's NVIDIA backend.  Fails
    with the output's tail unless it exits 0; returns its stdout."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout
