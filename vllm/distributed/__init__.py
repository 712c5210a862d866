"""Tensor parallelism across processes: the TP group the layers reduce over."""
from vllm.distributed.group import TensorParallelGroup, free_port, init_tensor_parallel_group

__all__ = ["TensorParallelGroup", "free_port", "init_tensor_parallel_group"]
