"""Executors: the engine's handle on the ranks that run the model.

    create_executor(args)
        tensor_parallel_size == 1 -> UniProcExecutor: one Worker, in this process
        tensor_parallel_size  > 1 -> MultiprocExecutor (multiproc.py): the driver
                                     Worker (rank 0) here, ranks 1.. in worker processes

Either way the engine talks to ``driver`` (rank 0: its runner samples) and to
``lora_manager`` (on several ranks, every state-changing call is repeated on
each rank, so all ranks hold the same adapters in the same slots).
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform
from vllm.worker.worker import Worker


class Executor:
    driver: Worker
    lora_manager: Optional[object]
    num_blocks: int

    def shutdown(self) -> None:
        """Stop the other ranks (nothing to do for one rank)."""


class UniProcExecutor(Executor):
    def __init__(self, args: EngineArgs) -> None:
        self.driver = Worker(args)
        self.num_blocks = self.driver.num_kv_blocks()
        self.driver.init_kv_cache(self.num_blocks)
        self.lora_manager = self.driver.lora_manager


def create_executor(args: EngineArgs) -> Executor:
    if args.tensor_parallel_size == 1:
        return UniProcExecutor(args)
    if current_platform().is_cuda() and args.tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={args.tensor_parallel_size} needs as many GPUs, but "
                         f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES); lower it")
    from vllm.executor.multiproc import MultiprocExecutor

    return MultiprocExecutor(args)
