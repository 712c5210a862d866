from vllm.model_executor.layers.fused_moe.router.fused_topk import fused_topk, fused_topk_reference

__all__ = ["fused_topk", "fused_topk_reference"]
