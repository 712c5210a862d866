"""Int4 checkpoints through ``LLM``: the same greedy tokens as transformers + peft on the dequantised weights.

Each case writes a tiny random model, quantizes it in one format (``int4_checkpoints.py``, packed
independently of the engine) and writes the float checkpoint of the dequantised weights, which
transformers loads.  Two random adapters trained on that float model run in one mixed batch.

The experts run either through the stand-in method (``int4_stand_in.py``: the loading path end to
end, float experts) or through the real ``Int4MoEMethod`` (skipped where it is not built).  The
dense-fallback cases keep the experts in float (excluded in the config) and need neither.
"""
from __future__ import annotations

import logging

import pytest
import torch

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model
from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.quantization.int4_checkpoints import write_int4_checkpoint
from tests.quantization.int4_stand_in import MODULE, install_stand_in
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PROMPTS = ["hello world", "abc", "the quick brown fox", "xyz 123"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GROUP = 16
EXPERTS_IN_FLOAT = (r".*\.experts\..*",)


class Case:
    def __init__(self, tmp, arch: str, fmt: str, *, asym: bool, act_order: bool = False, skip=()) -> None:
        from transformers import AutoModelForCausalLM

        self.fmt = fmt
        float_dir, self.path, deq_dir = str(tmp / "float"), str(tmp / "int4"), str(tmp / "deq")
        _, _, self.tok = tiny_model_dir(arch, float_dir)
        self.quantized = write_int4_checkpoint(float_dir, self.path, deq_dir, fmt, group_size=GROUP, asym=asym,
                                               act_order=act_order, skip=skip)
        self.hf = AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
        self.adapters = [make_peft_adapter(self.hf, tmp / f"a{i}", rank=r, seed=20 + i) for i, r in enumerate([8, 4])]
        self.requests = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(self.adapters)]

    def check_mixed_batch(self, **kw) -> LLM:
        llm = LLM(self.path, enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=128, block_size=4,
                  num_gpu_blocks_override=256, **kw)
        which = [None, 0, 1, 0]
        outs = llm.generate(PROMPTS, GREEDY, lora_request=[None if w is None else self.requests[w] for w in which],
                            use_tqdm=False)
        refs = [greedy(self.hf if w is None else peft_model(self.hf, self.adapters[w]), self.tok, p, 12)
                for p, w in zip(PROMPTS, which)]
        assert [o.outputs[0].token_ids for o in outs] == refs
        assert refs[2] != greedy(self.hf, self.tok, PROMPTS[2], 12)  # the adapters change the output
        return llm


@pytest.fixture(params=["stand-in", "Int4MoEMethod"])
def experts_method(request, monkeypatch):
    if request.param == "Int4MoEMethod":
        pytest.importorskip(MODULE)
        return None
    return install_stand_in(monkeypatch)


def _check_stand_in_calls(stand_in, case: Case, num_experts: int, scheme: tuple) -> None:
    """Every expert (the last one too) and shard reached load_int4 once per MoE layer, as an Int4Weight."""
    assert stand_in.instances
    for method in stand_in.instances:
        assert method.args == scheme
        got = sorted((e, s) for s, e, _ in method.calls)
        assert got == sorted((e, s) for e in range(num_experts) for s in ("w1", "w3", "w2"))
        assert all((w.g_idx is not None) == scheme[2] for _, _, w in method.calls)


QWEN3_CASES = {  # name: (format, asym, act_order)
    "gptq-sym": ("gptq", False, False),
    "gptq-asym-act-order": ("gptq", True, True),
    "awq": ("awq", True, False),
    "ct-sym": ("compressed-tensors", False, False),
    "ct-asym-act-order": ("compressed-tensors", True, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", list(QWEN3_CASES))
def test_qwen3_moe_int4_matches_peft_on_dequantised_weights(case_name, experts_method, tmp_path):
    fmt, asym, act_order = QWEN3_CASES[case_name]
    case = Case(tmp_path, "qwen3_moe", fmt, asym=asym, act_order=act_order)
    assert any(".experts." in n for n in case.quantized) and any("self_attn" in n for n in case.quantized)
    case.check_mixed_batch(quantization=fmt)
    if experts_method is not None:
        _check_stand_in_calls(experts_method, case, 8, (GROUP, asym, act_order))


@pytest.mark.slow
def test_per_expert_adapter_layout_on_int4_experts(tmp_path):
    """An adapter saved in the older per-expert layout (experts.{e}.gate_proj...) gives the same tokens
    as its fused-layout original on the real int4 experts (both equal peft on the dequantised weights)."""
    pytest.importorskip(MODULE)
    from tests.entrypoints.lora_adapters import to_per_expert_layout

    case = Case(tmp_path, "qwen3_moe", "gptq", asym=True, act_order=True)
    cfg = case.hf.config
    per_expert = to_per_expert_layout(case.adapters[0], str(tmp_path / "per_expert"), cfg.num_experts,
                                      cfg.hidden_size, cfg.moe_intermediate_size)
    llm = case.check_mixed_batch()
    fused = llm.generate(PROMPTS, GREEDY, lora_request=case.requests[0], use_tqdm=False)
    per = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("pe", 7, per_expert), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in per] == [o.outputs[0].token_ids for o in fused]
    assert [o.outputs[0].token_ids for o in fused] != [o.outputs[0].token_ids
                                                       for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,fmt,asym,act_order", [
    ("qwen2_moe", "gptq", True, True),  # shared expert: quantized dense module, dequantised on load
    ("mixtral", "compressed-tensors", True, False),  # block_sparse_moe.experts.{e}.w1/w3/w2
    ("olmoe", "awq", True, False),
])
def test_other_models_load_int4(arch, fmt, asym, act_order, experts_method, tmp_path):
    case = Case(tmp_path, arch, fmt, asym=asym, act_order=act_order)
    case.check_mixed_batch()
    if experts_method is not None:
        experts = {"qwen2_moe": 6, "mixtral": 4, "olmoe": 8}[arch]
        _check_stand_in_calls(experts_method, case, experts, (GROUP, asym, act_order))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_dense_modules_dequantised_on_load_with_float_experts(fmt, tmp_path, caplog):
    """Experts excluded from quantization (dynamic / modules_to_not_convert / ignore): they stay float,
    quantized attention and dense MLPs are dequantised on load, and one log line says so."""
    case = Case(tmp_path, "qwen2_moe", fmt, asym=True, skip=EXPERTS_IN_FLOAT)
    assert not any(".experts." in n for n in case.quantized)
    assert any("shared_expert" in n for n in case.quantized) and any("self_attn" in n for n in case.quantized)
    with caplog.at_level(logging.INFO, logger="vllm"):
        case.check_mixed_batch()
    lines = [r.getMessage() for r in caplog.records if "quantized non-expert" in r.getMessage()]
    assert len(lines) == 1 and f"{len(case.quantized)} quantized non-expert module(s)" in lines[0], lines


def test_quantization_argument_must_match_the_checkpoint(tmp_path):
    path, _, _ = tiny_model_dir("qwen3_moe", tmp_path / "float")
    with pytest.raises(ValueError, match="no quantization_config: only quantized checkpoints"):
        LLM(path, quantization="gptq")
    write_int4_checkpoint(path, str(tmp_path / "int4"), str(tmp_path / "deq"), "awq", group_size=GROUP, asym=True,
                          skip=EXPERTS_IN_FLOAT)
    with pytest.raises(ValueError, match="quantized with 'awq'; drop the option or pass 'awq'"):
        LLM(str(tmp_path / "int4"), quantization="gptq")


def test_serve_flag_sets_quantization():
    from vllm.entrypoints.cli import make_parser
    from vllm.entrypoints.openai.api_server import engine_args_from

    parse = lambda *a: engine_args_from(make_parser().parse_args(["serve", "M", *a]))  # noqa: E731
    assert parse("--quantization", "gptq").quantization == "gptq"
    assert parse("-q", "awq").quantization == "awq"
    assert parse().quantization is None
