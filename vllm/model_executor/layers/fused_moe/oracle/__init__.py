from vllm.model_executor.layers.fused_moe.oracle.unquantized import (
    UnquantizedMoEBackend,
    experts_class,
    select_unquantized_moe_backend,
)

__all__ = ["UnquantizedMoEBackend", "experts_class", "select_unquantized_moe_backend"]
