"""Every architecture with the fused Triton norm / q-k-rope kernels forced on (the interpreter on
CPU, native on a GPU) against the same model on its torch path: prefill and decode logits, greedy
tokens."""
import pytest
import torch

from tests.models.hf_checkpoints import ARCHS, PagedRunner, make_checkpoint, single_thread  # noqa: F401
from tests.utils import assert_close
from vllm.config.model import ModelConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.model_loader import get_model
from vllm.model_executor.models.common import DecoderAttention

PROMPTS = [[3, 17, 101, 5, 64], [9, 2, 77, 120, 33, 33, 8], [50, 51, 52]]


def _force(model: torch.nn.Module, use_triton: bool) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, (RMSNorm, DecoderAttention)):
            m.use_triton = use_triton
            n += 1
    return n


def _run(model, cfg) -> list[torch.Tensor]:
    runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                         num_seqs=len(PROMPTS))
    out = [torch.cat(runner.prefill(PROMPTS))]
    last = [p[-1] for p in PROMPTS]
    for _ in range(3):
        logits = runner.decode(last)
        out.append(logits)
        last = logits.argmax(-1).tolist()
    return out


def _off_and_on(cfg, device, monkeypatch, module, name: str, check=lambda on: None) -> list[list[torch.Tensor]]:
    """The fused kernels forced on, ``module.name`` False then True: each run's logits; ``check(on)`` after each."""
    runs = []
    for on in (False, True):
        monkeypatch.setattr(module, name, on)
        model = get_model(cfg, device=device)
        _force(model, True)
        runs.append(_run(model, cfg))
        check(on)
    return runs


# OLMoE also with clip_qkv (clamped after the full-row norms, inside the fused kernel)
@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in sorted(ARCHS)] + [("olmoe", {"clip_qkv": 0.5})])
def test_fused_kernels_match_torch_path(arch, overrides, tmp_path, device):
    make_checkpoint(arch, tmp_path, **overrides)
    cfg = ModelConfig(str(tmp_path), dtype="float32")
    model = get_model(cfg, device=device)
    assert _force(model, False) >= 3 * cfg.num_layers
    want = _run(model, cfg)
    model = get_model(cfg, device=device)
    assert _force(model, True) >= 3 * cfg.num_layers  # two norms and the attention of every layer
    got = _run(model, cfg)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, name=f"{arch} step {i} logits")
        assert torch.equal(g.argmax(-1), w.argmax(-1)), f"{arch} step {i}: greedy tokens differ"


# OLMoE with clip_qkv: the values are clipped inside the fused write too
@pytest.mark.parametrize("arch,overrides", [(a, {}) for a in sorted(ARCHS)] + [("olmoe", {"clip_qkv": 0.5})])
def test_kv_write_in_qk_norm_rope_matches_the_attention_write(arch, overrides, tmp_path, monkeypatch, device):
    """The Triton attention backend; FUSED_KV_WRITE on: the q/k launch stores K/V and the attention's own
    write never runs, with the same logits bit for bit as the attention's write."""
    import vllm.attention.triton_backend as triton_backend
    from vllm.model_executor.layers import attention

    if device.type == "cpu":
        monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "triton")  # the interpreter (conftest)
    writes = []
    real = triton_backend.write_kv_triton
    monkeypatch.setattr(triton_backend, "write_kv_triton", lambda *a, **k: (writes.append(1), real(*a, **k)))
    make_checkpoint(arch, tmp_path, **overrides)
    cfg = ModelConfig(str(tmp_path), dtype="float32")

    def check(fused: bool) -> None:
        assert (len(writes) == 0) == fused, f"{len(writes)} attention KV writes with FUSED_KV_WRITE={fused}"
        writes.clear()

    runs = _off_and_on(cfg, device, monkeypatch, attention, "FUSED_KV_WRITE", check)
    for i, (g, w) in enumerate(zip(runs[1], runs[0])):
        assert torch.equal(g, w), f"{arch} step {i}: logits differ"

