"""Our four MoE models against transformers on tiny random float32 checkpoints.

For each architecture: a batch of prompts of different lengths is prefilled
through the paged KV cache and its logits compared with transformers' forward
on each prompt alone; then greedy decoding one token per step must give the
same token ids (and close logits) as transformers' ``generate``.  The same
weights saved in transformers 5's fused in-memory expert layout must load into
bit-identical logits.  Each test runs on the CPU and, where one is present, on a
CUDA GPU (TritonExperts and the Triton paged attention; float32 dots are ieee
there, so the float32 bounds and greedy equality hold unchanged).
"""
import pytest
import torch
from safetensors.torch import save_file

from tests.models.hf_checkpoints import (ARCHS, PagedRunner, assert_kernels_on_gpu, check_paged_greedy_against_hf,
                                         make_checkpoint, single_thread)  # noqa: F401  (single_thread: fixture)
from vllm.config.model import ModelConfig
from vllm.model_executor.model_loader import get_model

PROMPTS = [[3, 17, 101, 5, 64], [9, 2, 77, 120, 33, 33, 8, 45, 90, 11, 6], [50, 51, 52]]
NEW_TOKENS = 9  # the first from the prefill, then 8 decode steps
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(request.param, folder)
    return request.param, folder, hf


def _runner(model_config: ModelConfig, model) -> PagedRunner:
    return PagedRunner(model, num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                       num_layers=model_config.num_layers, num_seqs=len(PROMPTS))


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_and_greedy_decode_match_transformers(checkpoint, device):
    arch, folder, hf = checkpoint
    cfg = ModelConfig(str(folder), dtype="float32")
    model = get_model(cfg, device=device)
    runner = _runner(cfg, model)
    if device == "cuda":
        assert_kernels_on_gpu(model)

    check_paged_greedy_against_hf(runner, hf, PROMPTS, NEW_TOKENS, arch)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_expert_layout_loads_identically(checkpoint, tmp_path, device):
    arch, folder, hf = checkpoint
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "expected transformers' fused in-memory keys"
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    logits = []
    for path in (folder, tmp_path):
        cfg = ModelConfig(str(path))
        model = get_model(cfg, device=device)
        logits.append(torch.cat(_runner(cfg, model).prefill(PROMPTS)))
    assert torch.equal(logits[0], logits[1])
