"""Environment variables and platform detection."""
import pytest

from vllm import envs
from vllm.platforms import current_platform


def test_env_values_are_typed(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    assert envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING is True
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    assert envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING is False
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "maybe")
    with pytest.raises(ValueError, match="not a boolean"):
        _ = envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "tpu")
    with pytest.raises(ValueError, match="cuda, cpu"):
        _ = envs.VLLM_TARGET_DEVICE
    with pytest.raises(AttributeError):
        _ = envs.VLLM_NOT_A_VARIABLE


def test_platform_is_detected_once():
    import torch

    p = current_platform()
    assert p is current_platform()
    assert p.device_type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert p.can_run_triton()  # tests run Triton on the GPU, or in the interpreter on CPU
