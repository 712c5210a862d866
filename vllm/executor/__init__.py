"""Who runs the model: one rank in this process, or tensor-parallel ranks in worker processes."""
from vllm.executor.executor import Executor, UniProcExecutor, create_executor

__all__ = ["Executor", "UniProcExecutor", "create_executor"]
