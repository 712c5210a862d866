"""vllm: a vLLM-shaped engine whose fused-MoE layers serve many LoRA adapters at once."""
__version__ = "0.1.0"
