"""Engine arguments (the keyword arguments of ``LLM`` and the flags of ``vllm serve``) -> configs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from vllm.config.cache import CacheConfig
from vllm.config.lora import LoRAConfig
from vllm.config.model import ModelConfig
from vllm.config.scheduler import SchedulerConfig, default_max_num_batched_tokens


@dataclass
class EngineArgs:
    model: str
    tokenizer: Optional[str] = None  # default: the model's folder
    revision: Optional[str] = None  # hub ids: the branch, tag or commit of the cached snapshot (default: main)
    tokenizer_revision: Optional[str] = None  # for a hub-id tokenizer (default: revision)
    generation_config: str = "auto"  # "auto": the model's generation_config.json; "vllm": ignore it; or a folder
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: Optional[bool] = None  # None: on (vLLM's default); False: every prompt computed whole
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE layers: whole experts split over the TP ranks (vllm.config.parallel)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    fully_sharded_loras: bool = False
    moe_backend: Optional[str] = None
    trust_remote_code: bool = False
    quantization: Optional[str] = None  # must match the checkpoint's quantization_config (gptq, awq, ...)
    enforce_eager: bool = False  # no CUDA graphs (they are used for decode steps on CUDA by default)
    cuda_graph_sizes: Optional[list[int]] = None  # decode batch sizes to capture (default: a ladder to max_num_seqs)
    # queue decode step n+1 before reading step n's tokens (vllm.engine.async_scheduling); None = on with one CUDA
    # GPU (vLLM's default since 0.14), off on CPU and with tensor_parallel_size > 1
    async_scheduling: Optional[bool] = None
    # who builds the engine (vLLM's UsageContext): "llm_class" (set by ``LLM``), "openai_api_server"
    # (``vllm serve``) or None; it picks the default max_num_batched_tokens (config/scheduler.py)
    usage_context: Optional[str] = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; supported: {', '.join(sorted(names))}")
        return cls(model=model, **kwargs)

    def create_configs(self) -> tuple[ModelConfig, CacheConfig, SchedulerConfig, Optional[LoRAConfig]]:
        if self.usage_context not in (None, "llm_class", "openai_api_server"):
            raise ValueError("usage_context must be None, 'llm_class' or 'openai_api_server', "
                             f"got {self.usage_context!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        model_config = ModelConfig(self.model, dtype=self.dtype, max_model_len=self.max_model_len, seed=self.seed,
                                   trust_remote_code=self.trust_remote_code, revision=self.revision,
                                   quantization=self.quantization)
        if self.enable_expert_parallel:
            from vllm.config.parallel import check_expert_parallel

            check_expert_parallel(model_config.hf_config, self.tensor_parallel_size,
                                  fully_sharded_loras=self.enable_lora and self.fully_sharded_loras)
        cache_config = CacheConfig(block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                                   num_gpu_blocks_override=self.num_gpu_blocks_override,
                                   enable_prefix_caching=(True if self.enable_prefix_caching is None
                                                          else self.enable_prefix_caching))
        lora_config = None
        if self.enable_lora:
            lora_config = LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                                     max_cpu_loras=self.max_cpu_loras, fully_sharded_loras=self.fully_sharded_loras)
        batched = self.max_num_batched_tokens or max(
            default_max_num_batched_tokens(self.usage_context, self.tensor_parallel_size), model_config.max_model_len)
        scheduler_config = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=batched,
                                           max_model_len=model_config.max_model_len,
                                           max_loras=self.max_loras if self.enable_lora else None)
        return model_config, cache_config, scheduler_config, lora_config


@dataclass
class AsyncEngineArgs(EngineArgs):
    """vLLM's name for the arguments of ``AsyncLLMEngine.from_engine_args``: the same fields."""
