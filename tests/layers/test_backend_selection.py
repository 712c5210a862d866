"""Backend selection: LoRA-incapable experts are skipped with a reason, or refused when asked for."""
import logging

import pytest
import torch

from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.oracle import UnquantizedMoEBackend as B
from vllm.model_executor.layers.fused_moe.oracle import experts_class, select_unquantized_moe_backend


def _cfg(**kw):
    return FusedMoEConfig(num_experts=8, experts_per_token=2, hidden_dim=32, intermediate_size=32,
                          in_dtype=torch.float32, **kw)


def test_capabilities_are_truthful():
    assert experts_class(B.TRITON).supports_lora()
    assert experts_class(B.TORCH).supports_lora()
    assert not experts_class(B.NAIVE_DENSE).supports_lora()
    assert "no per-(token, expert)" in experts_class(B.NAIVE_DENSE).lora_unsupported_reason()


def test_lora_skips_backend_without_lora_and_logs_why(caplog):
    with caplog.at_level(logging.DEBUG, logger="vllm"):  # per layer: DEBUG (the loader logs once at INFO)
        got = select_unquantized_moe_backend(_cfg(lora_enabled=True), FusedMoEQuantConfig(), "cpu",
                                             priority=[B.NAIVE_DENSE, B.TORCH])
    assert got is B.TORCH
    assert any("skipping MoE backend naive_dense" in r.getMessage() and "LoRA" in r.getMessage()
               for r in caplog.records)


def test_without_lora_the_first_backend_wins():
    got = select_unquantized_moe_backend(_cfg(), FusedMoEQuantConfig(), "cpu", priority=[B.NAIVE_DENSE, B.TORCH])
    assert got is B.NAIVE_DENSE


def test_explicit_backend_without_lora_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        select_unquantized_moe_backend(_cfg(lora_enabled=True, moe_backend="naive_dense"), FusedMoEQuantConfig(),
                                       "cpu")
    msg = str(err.value)
    assert "'naive_dense'" in msg and "LoRA" in msg and "torch" in msg


def test_explicit_backend_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_FUSED_MOE_BACKEND", "naive_dense")
    assert select_unquantized_moe_backend(_cfg(), FusedMoEQuantConfig(), "cpu") is B.NAIVE_DENSE
    with pytest.raises(ValueError, match="naive_dense"):
        select_unquantized_moe_backend(_cfg(lora_enabled=True), FusedMoEQuantConfig(), "cpu")


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="valid backends: triton, torch, naive_dense"):
        select_unquantized_moe_backend(_cfg(moe_backend="cutlass"), FusedMoEQuantConfig(), "cpu")


def test_triton_needs_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    answer = experts_class(B.TRITON).check_config(_cfg(), FusedMoEQuantConfig(), torch.device("cpu"))
    assert not answer and "CUDA" in answer.reason
