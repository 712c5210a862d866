"""Model architectures; ``ModelRegistry`` maps config.json ``architectures`` to a class."""
from vllm.model_executor.models.registry import ModelRegistry

__all__ = ["ModelRegistry"]
