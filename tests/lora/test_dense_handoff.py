"""The dense LoRA handoff (``lora/layers/dense_handoff.py``): with ``HANDOFF`` on, each attention block's q/k/v
and o projections run bare and their deltas are added by the input norm (shrink), q/k norm + rotary and the
residual norm after o (``ops/pending_delta.py``).

Whole models with a peft adapter on attention and experts, one request on it and one on the base model: the
prefill logits against peft's (adapter on / off), and three decode steps against the same model with the handoff
off - on the Triton wrapper, with the fused norm kernels forced on (the interpreter on CPU) and on their torch
paths.  Each run counts the projections that ran bare, so a handoff that silently fell back is caught; and where
it must not be taken (the switch off, more than ``HANDOFF_MAX_TOKENS`` rows, no token on the layer's adapters).
"""
import pytest
import torch

from tests.lora.test_model_manager import _peft_adapter, checkpoints, manager  # noqa: F401  (fixture)
from tests.models.hf_checkpoints import PagedRunner
from tests.models.test_fused_ops_models import _force
from tests.utils import assert_close
from vllm.config.model import ModelConfig
from vllm.lora.layers import dense_handoff
from vllm.lora.request import LoRARequest
from vllm.model_executor.layers.ops import pending_delta
from vllm.model_executor.layers.ops.pending_delta import pending_for

PROMPTS = [[3, 17, 101, 5, 64, 9], [9, 2, 77, 120, 33, 33, 8]]


@pytest.fixture
def bare_calls(monkeypatch):
    calls = []
    real = dense_handoff.forward_bare

    def spy(layer, x, pending):
        calls.append((layer.base_kind, pending.part is None))
        return real(layer, x, pending)

    monkeypatch.setattr(dense_handoff, "forward_bare", spy)
    return calls


def _off_and_on(folder, tmp_path, device, monkeypatch, run) -> dict:
    """{on: run(mgr, model, cfg, on)} with ``HANDOFF`` off, then on: each on a fresh model and LoRA manager (the
    Triton wrapper, rank 16) holding the peft adapter as id 7."""
    runs = {}
    monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", True)
    for on in (False, True):
        monkeypatch.setattr(dense_handoff, "HANDOFF", on)
        mgr, model, cfg = manager(folder, kind="gpu", rank=16, device=device)
        assert mgr.add_adapter(LoRARequest("a", 7, str(tmp_path / "adapter")))
        runs[on] = run(mgr, model, cfg, on)
    return runs


def _run(mgr, model, cfg, use_triton: bool) -> list[torch.Tensor]:
    _force(model, use_triton)
    mgr.set_adapter_mapping([7] * len(PROMPTS[0]) + [0] * len(PROMPTS[1]))
    runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                         num_seqs=2)
    out = [torch.cat(runner.prefill(PROMPTS))]
    last = [int(out[0][len(PROMPTS[0]) - 1].argmax()), int(out[0][-1].argmax())]
    for _ in range(3):
        mgr.set_adapter_mapping([7, 0])
        logits = runner.decode(last)
        out.append(logits)
        last = logits.argmax(-1).tolist()
    return out


@pytest.mark.parametrize("arch,use_triton", [("qwen3_moe", True), ("qwen3_moe", False), ("olmoe", True),
                                             ("mixtral", True)])
def test_handoff_matches_peft_and_the_layers_own_add(checkpoints, tmp_path, monkeypatch, bare_calls, arch,  # noqa: F811
                                                     use_triton, device):
    folder, hf = checkpoints(arch)
    peft_model = _peft_adapter(hf, tmp_path / "adapter")

    def run(mgr, model, cfg, on):
        n = len(bare_calls)
        out = _run(mgr, model, cfg, use_triton)
        calls = bare_calls[n:]
        if not on:
            assert not calls
        else:  # 4 steps x layers x (q/k/v shrunk by the norm before it, o shrunk by its own layer)
            assert calls.count(("QKVParallelLinear", False)) == 4 * cfg.num_layers, calls
            assert calls.count(("RowParallelLinear", True)) == 4 * cfg.num_layers, calls
        return out

    try:
        runs = _off_and_on(folder, tmp_path, device, monkeypatch, run)
        with torch.no_grad():
            want_lora = peft_model(torch.tensor([PROMPTS[0]])).logits[0]
            with peft_model.disable_adapter():
                want_base = peft_model(torch.tensor([PROMPTS[1]])).logits[0]
        got = runs[True][0].cpu().split([len(p) for p in PROMPTS])
        assert_close(got[0], want_lora, torch.float32, name=f"{arch} logits with the adapter")
        assert_close(got[1], want_base, torch.float32, name=f"{arch} logits without adapter")
        for i, (g, w) in enumerate(zip(runs[True], runs[False])):
            assert_close(g.cpu(), w.cpu(), torch.float32, name=f"{arch} step {i}: handoff vs the layers' own add")
            assert torch.equal(g.argmax(-1), w.argmax(-1)), f"{arch} step {i}: greedy tokens differ"
    finally:
        peft_model.unload()


def test_when_the_layers_add_their_own_delta(checkpoints, tmp_path, monkeypatch, device):  # noqa: F811
    folder, hf = checkpoints("qwen3_moe")
    peft_model = _peft_adapter(hf, tmp_path / "adapter")
    try:
        mgr, _, _ = manager(folder, kind="gpu", rank=16, device=device)
        assert mgr.add_adapter(LoRARequest("a", 7, str(tmp_path / "adapter")))
        qkv = mgr.modules["model.layers.0.self_attn.qkv_proj"]
        x = torch.randn(3, qkv.input_size, device=device)
        mgr.set_adapter_mapping([7, 0, 7])
        monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", True)
        monkeypatch.setattr(dense_handoff, "HANDOFF", False)
        assert pending_for(qkv, x) is None  # the switch is off
        monkeypatch.setattr(dense_handoff, "HANDOFF", True)
        p = pending_for(qkv, x)
        assert p is not None and p.slice_sizes == tuple(qkv.output_slices) and p.a is not None and p.part is None
        assert pending_for(qkv.base_layer, x) is None  # not a LoRA layer
        monkeypatch.setattr(dense_handoff, "HANDOFF_MAX_TOKENS", 2)
        assert pending_for(qkv, x) is None  # more rows than HANDOFF_MAX_TOKENS
        monkeypatch.setattr(dense_handoff, "HANDOFF_MAX_TOKENS", 64)
        if device.type == "cpu":
            monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", False)
            assert pending_for(qkv, x) is None  # CPU tensors: the layers' own add (nothing launched to save)
            monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", True)
        mgr.set_adapter_mapping([0, 0, 0])
        assert pending_for(qkv, x) is None  # no token on the layer's adapters: nothing to add
        mgr.set_adapter_mapping([7, 0, 7])
        qkv.use_fused_decode = True
        assert pending_for(qkv, x) is None  # the fused projection + LoRA adds it
        o = mgr.modules["model.layers.0.self_attn.o_proj"]
        xo = torch.randn(3, o.input_size, device=device)
        assert pending_for(o, xo) is not None
        monkeypatch.setattr(pending_delta, "MAX_DELTA_TILE", 16)
        assert pending_for(o, xo) is None  # B's rows of one residual-norm row would not fit in its registers
    finally:
        peft_model.unload()


def test_one_token_steps_shrink_in_the_o_gemv(checkpoints, tmp_path, monkeypatch, device):  # noqa: F811
    """One sequence on the adapter: its decode steps run the o projection as the decode GEMV (forced here for
    one-token rows, CUDA or not), whose extra programs write the o shrink - no shrink launch of its own - with the
    logits of the layers' own add."""
    from vllm.model_executor.layers.ops import dense_gemv

    real_applies = dense_gemv.gemv_applies
    monkeypatch.setattr(dense_gemv, "gemv_applies",
                        lambda x, w, max_tokens=None: real_applies(x, w, 1) or (x.numel() == x.shape[-1] and
                                                                                w.dtype == x.dtype == torch.float32))
    shrinks = []
    real_shrink = dense_handoff.shrink
    monkeypatch.setattr(dense_handoff, "shrink", lambda p, x: (shrinks.append(x.shape[0]), real_shrink(p, x)))
    folder, hf = checkpoints("qwen3_moe")
    peft_model = _peft_adapter(hf, tmp_path / "adapter")

    def run(mgr, model, cfg, on):
        _force(model, True)
        prompt = PROMPTS[0]
        mgr.set_adapter_mapping([7] * len(prompt))
        runner = PagedRunner(model, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_layers=cfg.num_layers,
                             num_seqs=1)
        out = [runner.prefill([prompt])[0]]
        last = [int(out[0][-1].argmax())]
        for _ in range(3):
            mgr.set_adapter_mapping([7])
            out.append(runner.decode(last))
            last = out[-1].argmax(-1).tolist()
        return out

    try:
        runs = _off_and_on(folder, tmp_path, device, monkeypatch, run)
        cfg = ModelConfig(str(folder))
        # the prefill's o projections (6 rows: not the GEMV) shrink in a launch of their own; decode steps never
        assert shrinks == [len(PROMPTS[0])] * cfg.num_layers, shrinks
        for i, (g, w) in enumerate(zip(runs[True], runs[False])):
            assert_close(g.cpu(), w.cpu(), torch.float32, name=f"step {i}: handoff vs the layers' own add")
    finally:
        peft_model.unload()
