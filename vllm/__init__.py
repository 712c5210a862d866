"""vllm: a vLLM-shaped engine whose fused-MoE layers serve many LoRA adapters at once.

``from vllm import LLM, SamplingParams``; ``from vllm.lora.request import LoRARequest``.
Heavy modules load on first use, so ``import vllm`` stays cheap.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LLMEngine", "EngineArgs", "AsyncLLMEngine",
           "AsyncEngineArgs", "TextPrompt", "TokensPrompt", "PromptType", "__version__"]

_LAZY = {
    "LLM": "vllm.entrypoints.llm",
    "SamplingParams": "vllm.sampling_params",
    "RequestOutput": "vllm.outputs",
    "CompletionOutput": "vllm.outputs",
    "LLMEngine": "vllm.engine.llm_engine",
    "EngineArgs": "vllm.engine.arg_utils",
    "AsyncEngineArgs": "vllm.engine.arg_utils",
    "AsyncLLMEngine": "vllm.engine.async_llm_engine",
    "TextPrompt": "vllm.inputs",
    "TokensPrompt": "vllm.inputs",
    "PromptType": "vllm.inputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm' has no attribute {name!r}")
