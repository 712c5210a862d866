"""One rank of the engine: its device, model shard, KV cache, LoRA manager and runner.

Rank 0 lives in the engine's process (the driver); with tensor parallelism the
other ranks live in worker processes (``vllm.executor.multiproc``) and run the
same methods when the driver asks.  Every rank builds the same model from the
same ``EngineArgs``, keeps its share of each parallel layer, and sees the same
sequence of LoRA-manager calls, so their adapter caches and slots stay equal.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.kv_cache import allocate_and_bind, num_kv_blocks
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.worker.model_runner import ModelInput, ModelRunner

logger = init_logger(__name__)


def rank_device(rank: int) -> torch.device:
    """Rank r uses CUDA device r on a GPU machine, the CPU otherwise."""
    platform = current_platform()
    if platform.is_cuda():
        if rank >= torch.cuda.device_count():
            raise ValueError(f"tensor parallel rank {rank} needs CUDA device {rank}, but only "
                             f"{torch.cuda.device_count()} are visible; lower tensor_parallel_size")
        return torch.device("cuda", rank)
    return platform.device


class Worker:
    def __init__(self, args: EngineArgs, rank: int = 0, world_size: int = 1, port: Optional[int] = None) -> None:
        self.rank, self.world_size = rank, world_size
        (self.model_config, self.cache_config, self.scheduler_config,
         self.lora_config) = args.create_configs()
        self.device = rank_device(rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(args.seed)
        self.tp_group = None
        if world_size > 1:
            from vllm.distributed import init_tensor_parallel_group

            self.tp_group = init_tensor_parallel_group(rank, world_size, port, self.device)
        from vllm.model_executor.model_loader import get_model

        logger.info("rank %d/%d: loading weights of %s (%s) on %s", rank, world_size, args.model,
                    self.model_config.dtype, self.device)
        self.model = get_model(self.model_config, device=self.device, lora_enabled=self.lora_config is not None,
                               moe_backend=args.moe_backend, tp_group=self.tp_group,
                               enable_expert_parallel=args.enable_expert_parallel)
        self.lora_manager = None
        if self.lora_config is not None:
            from vllm.lora.model_manager import LoRAModelManager
            from vllm.lora.punica_wrapper import get_punica_wrapper

            punica = get_punica_wrapper(self.scheduler_config.max_num_batched_tokens, self.lora_config.max_loras,
                                        self.device, tp_group=self.tp_group)
            self.lora_manager = LoRAModelManager(self.model, self.lora_config, punica)
        self.kv_caches: list[torch.Tensor] = []
        self.runner: Optional[ModelRunner] = None
        self.enforce_eager, self.cuda_graph_sizes = args.enforce_eager, args.cuda_graph_sizes

    def num_kv_blocks(self) -> int:
        """KV blocks this rank's memory allows (the engine takes the smallest over ranks)."""
        return num_kv_blocks(self.model, self.cache_config, self.scheduler_config, self.model_config.dtype,
                             self.device)

    def init_kv_cache(self, num_blocks: int, peers: Any = None) -> None:
        self.kv_caches = allocate_and_bind(self.model, num_blocks, self.cache_config.block_size,
                                           self.model_config.dtype, self.device)
        from vllm.worker.cuda_graphs import maybe_capture

        graphs = maybe_capture(self.model, device=self.device, world_size=self.world_size,
                               enforce_eager=self.enforce_eager, block_size=self.cache_config.block_size,
                               max_model_len=self.scheduler_config.max_model_len,
                               max_num_seqs=self.scheduler_config.max_num_seqs, lora_manager=self.lora_manager,
                               sizes=self.cuda_graph_sizes)
        self.runner = ModelRunner(self.model, block_size=self.cache_config.block_size, device=self.device,
                                  lora_manager=self.lora_manager, peers=peers, graphs=graphs)

    def execute_model(self, inp: ModelInput) -> None:
        """A non-driver rank's share of one step (its logits are rank 0's too, and only rank 0 samples)."""
        self.runner.compute_logits(inp)

    def call_lora_manager(self, method: str, *args: Any) -> Any:
        if self.lora_manager is None:
            raise RuntimeError("LoRA is not enabled on this worker")
        return getattr(self.lora_manager, method)(*args)
