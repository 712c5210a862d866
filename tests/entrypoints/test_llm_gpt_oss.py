"""gpt-oss through ``LLM``, with LoRA, against transformers + peft (tiny random checkpoint, CPU or GPU).

Two peft adapters on attention (biased q/k/v/o) and on the fused experts (``target_parameters``
``mlp.experts.gate_up_proj`` / ``down_proj``: gpt-oss's transposed [E, in, out] parameters, gate/up
interleaved) run in one batch with base requests; prompts (one id per character) are longer than the
sliding window (5), so the paged cache serves windowed layers.  The tokenizer's own chat template is
the one ``LLM.chat`` uses.
"""
import pytest
import torch

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model, to_per_expert_layout
from tests.entrypoints.tiny_models import char_tokenizer
from tests.models.gpt_oss_checkpoint import WINDOW, make_gpt_oss_checkpoint
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.utils import assert_close
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PROMPTS = ["hello world", "abc", "the quick brown fox", "xyz 123 xyz"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# a template no other tiny model uses: "<|user|>hi<|end|><|assistant|>"
GPT_OSS_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Setup:
    def __init__(self, folder):
        self.path = str(folder / "model")
        self.hf = make_gpt_oss_checkpoint(self.path)
        self.tok = char_tokenizer()
        self.tok.chat_template = GPT_OSS_TEMPLATE
        self.tok.save_pretrained(self.path)
        self.adapters = [make_peft_adapter(self.hf, folder / f"a{i}", rank=r, seed=20 + i, dense_mlp=False)
                         for i, r in enumerate([8, 4])]
        self.requests = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(self.adapters)]
        self._ref = {}

    def reference(self, prompt, adapter_index):
        key = (prompt, adapter_index)
        if key not in self._ref:
            model = self.hf if adapter_index is None else peft_model(self.hf, self.adapters[adapter_index])
            self._ref[key] = greedy(model, self.tok, prompt, GREEDY.max_tokens)
        return self._ref[key]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("gpt_oss_llm"))


def _llm(s, **kw):
    args = dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=128, block_size=4,
                num_gpu_blocks_override=256)
    args.update(kw)
    return LLM(s.path, **args)


def test_mixed_batch_matches_peft(setup):
    assert min(len(setup.tok.encode(p)) for p in PROMPTS if len(p) > 3) > WINDOW
    llm = _llm(setup)
    which = [None, 0, 1, 0]
    loras = [None if w is None else setup.requests[w] for w in which]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, w, out in zip(PROMPTS, which, outs):
        assert out.outputs[0].token_ids == setup.reference(prompt, w), (prompt, w)
    # the adapters change the model
    assert len({tuple(setup.reference(PROMPTS[0], w)) for w in (None, 0, 1)}) == 3


def test_dense_lora_handoff_matches_peft(setup, monkeypatch):
    """The dense LoRA handoff (lora/layers/dense_handoff.py) through the engine: biased q/k/v/o, sinks, the sliding
    window, two adapters and the base model in one batch (rank 8 and 4: kernel ranks differ per layer), greedy
    tokens equal peft's; the projections ran bare."""
    from vllm.lora.layers import dense_handoff

    monkeypatch.setattr(dense_handoff, "HANDOFF", True)
    monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", True)
    bare = []
    real = dense_handoff.forward_bare
    monkeypatch.setattr(dense_handoff, "forward_bare", lambda *a: (bare.append(1), real(*a))[1])
    which = [1, None, 0, 0]
    loras = [None if w is None else setup.requests[w] for w in which]
    outs = _llm(setup).generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, w, out in zip(PROMPTS, which, outs):
        assert out.outputs[0].token_ids == setup.reference(prompt, w), (prompt, w)
    assert bare


def test_logits_match_peft(setup):
    """Prefill logits of a prompt longer than the window, per adapter, vs peft (float32)."""
    from vllm.attention.metadata import build_metadata
    from vllm.forward_context import set_forward_context

    engine = _llm(setup).llm_engine
    ids = setup.tok.encode(PROMPTS[2])
    T = len(ids)
    for i, req in enumerate(setup.requests):
        engine.add_lora(req)
        engine.lora_manager.set_adapter_mapping([req.lora_int_id] * T)
        meta = build_metadata([T], [T], [list(range(-(-T // 4)))], 4, engine.device)
        with torch.no_grad(), set_forward_context(meta):
            ours = engine.model.compute_logits(engine.model(torch.tensor(ids, device=engine.device),
                                                            torch.arange(T, device=engine.device)))
            ref = peft_model(setup.hf, setup.adapters[i])(input_ids=torch.tensor([ids])).logits[0]
        assert_close(ours.float().cpu(), ref, torch.float32, name=f"adapter {i}")


def test_per_expert_adapter_gives_the_same_outputs(setup, tmp_path):
    """An adapter written per expert (``experts.{e}.gate_proj|up_proj|down_proj``, gate / up the even /
    odd rows of gpt-oss's interleaved gate_up) gives the fused adapter's outputs."""
    cfg = setup.hf.config
    per_expert = to_per_expert_layout(setup.adapters[0], str(tmp_path / "pe"), cfg.num_local_experts,
                                      cfg.hidden_size, cfg.intermediate_size, interleaved=True)
    llm = _llm(setup)
    fused = llm.generate(PROMPTS, GREEDY, lora_request=setup.requests[0], use_tqdm=False)
    split = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("pe", 9, per_expert), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in split] == [o.outputs[0].token_ids for o in fused]
    assert [o.outputs[0].token_ids for o in fused] == [setup.reference(p, 0) for p in PROMPTS]


def test_chat_uses_the_tokenizers_template(setup):
    llm = _llm(setup, enable_lora=False)
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == setup.tok.encode("<|user|>hi<|end|><|assistant|>")
    assert out.outputs[0].token_ids == greedy(setup.hf, setup.tok, "<|user|>hi<|end|><|assistant|>",
                                              GREEDY.max_tokens)
