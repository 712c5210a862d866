from vllm.config.lora import LoRAConfig

__all__ = ["LoRAConfig"]
