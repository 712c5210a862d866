"""The default step size follows vLLM's table by use (``vllm.config.scheduler.default_max_num_batched_tokens``):
16384 tokens for the offline ``LLM`` class on one GPU of >= 70 GiB other than an A100, 8192 otherwise."""
import os

import pytest

from vllm import LLM
from vllm.config import scheduler as sched_cfg
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms.interface import CpuPlatform, CudaPlatform

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
GIB = 2**30


class _FakeGpu(CudaPlatform):
    def __init__(self, name: str, gib: int) -> None:
        super().__init__()
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_bytes", gib * GIB)

    def device_name(self) -> str:
        return self._name

    def total_memory(self) -> int:
        return self._bytes


@pytest.mark.parametrize("platform,usage,tp,want", [
    (_FakeGpu("NVIDIA H200", 141), "llm_class", 1, 16384),
    (_FakeGpu("NVIDIA H100 80GB HBM3", 80), "llm_class", 1, 16384),
    (_FakeGpu("NVIDIA H200", 141), "openai_api_server", 1, 8192),
    (_FakeGpu("NVIDIA H200", 141), None, 1, 8192),
    (_FakeGpu("NVIDIA H200", 141), "llm_class", 2, 8192),
    (_FakeGpu("NVIDIA A100-SXM4-80GB", 80), "llm_class", 1, 8192),
    (_FakeGpu("NVIDIA L40S", 48), "llm_class", 1, 8192),
    (CpuPlatform(), "llm_class", 1, 8192),
])
def test_default_by_use_and_device(monkeypatch, platform, usage, tp, want):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "current_platform", lambda: platform)
    assert sched_cfg.default_max_num_batched_tokens(usage, tp) == want


def test_the_llm_class_says_who_it_is(monkeypatch):
    """``LLM`` builds its engine as "llm_class" (``vllm serve``: "openai_api_server"); an explicit value wins."""
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "current_platform", lambda: _FakeGpu("NVIDIA H200", 141))
    cfg = EngineArgs(MODEL, usage_context="llm_class").create_configs()[2]
    assert cfg.max_num_batched_tokens == 16384
    cfg = EngineArgs(MODEL, usage_context="llm_class", max_num_batched_tokens=4096).create_configs()[2]
    assert cfg.max_num_batched_tokens == 4096
    monkeypatch.undo()
    llm = LLM(MODEL, max_model_len=64)  # this machine's default (8192 on CPU, 16384 on an H100 / H200)
    assert llm.llm_engine.scheduler.config.max_num_batched_tokens == sched_cfg.default_max_num_batched_tokens(
        "llm_class", 1)
    monkeypatch.setattr(vllm.platforms, "current_platform", lambda: _FakeGpu("NVIDIA H200", 141))
    seen = []
    monkeypatch.setattr("vllm.entrypoints.llm.LLMEngine", lambda args: seen.append(args.usage_context))
    LLM(MODEL)
    LLM(MODEL, usage_context="openai_api_server")  # a value the caller gives is kept, not overwritten
    assert seen == ["llm_class", "openai_api_server"]


def test_the_server_says_who_it_is():
    pytest.importorskip("fastapi")
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    assert engine_args_from(make_parser().parse_args(["serve", MODEL])).usage_context == "openai_api_server"


def test_an_unknown_usage_context_is_refused():
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(MODEL, usage_context="batch").create_configs()
