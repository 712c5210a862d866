"""LLM(enable_lora=True) end to end against transformers + peft, on tiny random MoE models.

Adapters target attention, the fused experts (peft ``target_parameters``) and
the dense / shared-expert MLPs.  A batch mixes the base model and three adapters.
"""
import pytest
import torch

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model, to_per_expert_layout
from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

PROMPTS = ["hello world", "abc", "the quick brown fox", "xyz 123"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


class Setup:
    def __init__(self, arch, folder):
        self.arch = arch
        self.path, self.hf, self.tok = tiny_model_dir(arch, folder / "model")
        self.adapters = [make_peft_adapter(self.hf, folder / f"a{i}", rank=r, seed=10 + i)
                         for i, r in enumerate([8, 4, 8])]
        self.requests = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(self.adapters)]
        self._ref = {}

    def reference(self, prompt, adapter_index):
        key = (prompt, adapter_index)
        if key not in self._ref:
            model = self.hf if adapter_index is None else peft_model(self.hf, self.adapters[adapter_index])
            self._ref[key] = greedy(model, self.tok, prompt, 16)
        return self._ref[key]


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"])
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp(request.param))


def _llm(s, **kw):
    # peft 0.21 doubles the rank of a fused gate_up target (rank_pattern .*gate_up_proj: 2r): r=8 -> 16
    args = dict(enable_lora=True, max_loras=4, max_lora_rank=16, max_model_len=128, block_size=4,
                num_gpu_blocks_override=256)
    args.update(kw)
    return LLM(s.path, **args)


def test_mixed_batch_matches_peft_and_prompts_alone(setup):
    llm = _llm(setup)
    which = [None, 0, 1, 2]
    loras = [None if w is None else setup.requests[w] for w in which]
    together = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, w, lr, out in zip(PROMPTS, which, loras, together):
        ref = setup.reference(prompt, w)
        assert out.outputs[0].token_ids == ref, (prompt, w)
        alone = llm.generate(prompt, GREEDY, lora_request=lr, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == ref
    # the adapters do change the model
    assert len({tuple(setup.reference(PROMPTS[0], w)) for w in which}) == 4


# A whole bf16 forward (weights, adapters and every activation rounded to bf16) against peft in
# float32: the single-kernel bf16 bounds do not apply.  Measured on the CPU torch path for these
# tiny models: normalised max error 0.006-0.022, rms 0.006-0.019.
_MODEL_BF16_BOUNDS = (6e-2, 3e-2)
# In bf16 the router may pick another expert than float32 peft for a token whose top-k is a near
# tie, and that token's logits then differ by far more than rounding (measured on CPU, 4 models x
# 4 prompts x base + 3 adapters: 10 of 1120 token-layers flipped, all at top-k margins below 0.06
# in router logits).  Tokens whose smallest margin over the MoE layers is below this are left out
# of the bf16 comparison.
_BF16_ROUTER_MARGIN = 0.1


def _logits_and_router_margins(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers / peft logits [T, V] and each token's smallest top-k margin (k-th minus
    (k+1)-th router logit) over the MoE layers; transformers' *TopKRouter modules return
    (router logits, scores, expert ids)."""
    margins = []

    def hook(module, args, out):
        logits, _, expert_ids = out
        top = logits.reshape(len(ids), -1).float().sort(dim=-1, descending=True).values
        k = expert_ids.shape[-1]
        margins.append(top[:, k - 1] - top[:, k])

    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    assert margins, f"no *TopKRouter module in {type(model).__name__}: cannot tell near-tie tokens"
    return logits, torch.stack(margins).amin(dim=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_logits_match_peft(setup, dtype):
    """Prefill logits of one prompt per adapter against peft's float32 forward, in float32 and in
    bf16 (whose bound still tells an adapter from none).  On a CPU machine the engine runs the torch
    experts and the CPU Punica wrapper; on a GPU machine it runs on the GPU: TritonExperts, the GPU
    Punica wrapper, the Triton attention."""
    from tests.models.hf_checkpoints import assert_kernels_on_gpu
    from tests.utils import assert_close, normalized_errors
    from vllm.attention.metadata import build_metadata
    from vllm.forward_context import set_forward_context

    llm = _llm(setup, dtype=dtype)
    engine = llm.llm_engine
    if engine.device.type == "cuda":
        assert_kernels_on_gpu(engine.model)
        assert type(engine.lora_manager.punica_wrapper).__name__ == "PunicaWrapperGPU"
    ids = setup.tok.encode(PROMPTS[2])
    T = len(ids)
    with torch.no_grad():
        base_logits = setup.hf(input_ids=torch.tensor([ids])).logits[0].float()
    for i, req in enumerate(setup.requests):
        engine.add_lora(req)
        engine.lora_manager.set_adapter_mapping([req.lora_int_id] * T)
        meta = build_metadata([T], [T], [list(range(-(-T // 4)))], 4, engine.device)
        with torch.no_grad(), set_forward_context(meta):
            ours = engine.model.compute_logits(engine.model(torch.tensor(ids, device=engine.device),
                                                            torch.arange(T, device=engine.device)))
        ref, margin = _logits_and_router_margins(peft_model(setup.hf, setup.adapters[i]), ids)
        ours = ours.float().cpu()
        if dtype == torch.bfloat16:
            rows = margin >= _BF16_ROUTER_MARGIN
            assert int(rows.sum()) >= 0.75 * T, f"adapter {i}: too many near-tie tokens to compare: {margin}"
            ours, ref, base = ours[rows], ref[rows], base_logits[rows]
        assert_close(ours, ref, dtype, name=f"adapter {i}",
                     bounds=_MODEL_BF16_BOUNDS if dtype == torch.bfloat16 else None)
        if dtype == torch.bfloat16:  # the bound still tells an adapter from none
            _, rms_vs_base = normalized_errors(ours, base)
            assert rms_vs_base > 3 * _MODEL_BF16_BOUNDS[1], rms_vs_base


def test_per_expert_layout_gives_the_same_outputs(setup, tmp_path):
    cfg = setup.hf.config
    E = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    I = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    names = ("w1", "w3", "w2") if setup.arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if setup.arch == "mixtral" else "mlp"
    per_expert = to_per_expert_layout(setup.adapters[0], str(tmp_path / "pe"), E, cfg.hidden_size, I, block, names)
    llm = _llm(setup)
    a = llm.generate(PROMPTS, GREEDY, lora_request=setup.requests[0], use_tqdm=False)
    b = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("pe", 9, per_expert), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_more_adapters_than_slots_evicts_lru_and_stays_correct(setup):
    llm = _llm(setup, max_loras=1, max_cpu_loras=2)
    order = [0, 1, 2, 0, 2, 1]
    for w in order:
        out = llm.generate(PROMPTS[1], GREEDY, lora_request=setup.requests[w], use_tqdm=False)[0]
        assert out.outputs[0].token_ids == setup.reference(PROMPTS[1], w), w
    manager = llm.llm_engine.lora_manager
    assert len(manager.list_adapters()) <= 2 and len(manager.active_adapters) <= 1
    # a batch with more adapters than slots is split by the scheduler and still correct
    outs = llm.generate(PROMPTS[:3], GREEDY, lora_request=setup.requests, use_tqdm=False)
    for prompt, w, out in zip(PROMPTS[:3], range(3), outs):
        assert out.outputs[0].token_ids == setup.reference(prompt, w)


def test_bad_adapters_fail_clearly_and_the_engine_keeps_serving(setup, tmp_path):
    from vllm.lora.peft_loader import LoRALoadError

    llm = _llm(setup)
    too_big = make_peft_adapter(setup.hf, tmp_path / "r32", rank=32, seed=5)
    with pytest.raises(LoRALoadError, match="max_lora_rank"):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("big", 6, too_big), use_tqdm=False)
    with pytest.raises(LoRALoadError):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("missing", 7, str(tmp_path / "nope")),
                     use_tqdm=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRALoadError):
        llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("broken", 8, str(broken)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    outs = llm.generate(PROMPTS[:2], GREEDY, lora_request=[None, setup.requests[1]], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == setup.reference(PROMPTS[0], None)
    assert outs[1].outputs[0].token_ids == setup.reference(PROMPTS[1], 1)


def test_an_adapter_in_use_keeps_serving_when_its_folder_goes(setup, tmp_path):
    """max_cpu_loras=1: loading another adapter never evicts one a queued request uses (it would have
    to be read again later); so that request is served correctly even though its folder is gone."""
    import shutil

    from vllm.sampling_params import SamplingParams as SP

    gone = tmp_path / "gone"
    shutil.copytree(setup.adapters[2], gone)
    llm = _llm(setup, max_loras=1, max_cpu_loras=1)
    engine = llm.llm_engine
    engine.add_request("kept", PROMPTS[0], GREEDY, lora_request=LoRARequest("gone", 5, str(gone)))
    engine.add_request("fine", PROMPTS[1], GREEDY, lora_request=setup.requests[1])
    shutil.rmtree(gone)
    engine.add_request("base", PROMPTS[2], SP(temperature=0, max_tokens=16, ignore_eos=True))
    done = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert done["kept"].error is None and done["kept"].outputs[0].token_ids == setup.reference(PROMPTS[0], 2)
    assert done["fine"].outputs[0].token_ids == setup.reference(PROMPTS[1], 1)
    assert done["base"].outputs[0].token_ids == setup.reference(PROMPTS[2], None)


def test_loading_an_adapter_never_evicts_one_in_use(setup):
    """CPU cache of 2 holding [A, B] (A least recently used); a request on A is queued, then one on C.
    Loading C must evict B (unused), not A (in use but least recently used)."""
    llm = _llm(setup, max_loras=2, max_cpu_loras=2)
    engine = llm.llm_engine
    a, b, c = setup.requests
    engine.add_lora(a)
    engine.add_lora(b)
    engine.add_request("x", PROMPTS[0], GREEDY, lora_request=a)
    engine.add_request("y", PROMPTS[1], GREEDY, lora_request=c)
    assert set(engine.lora_manager.list_adapters()) == {a.lora_int_id, c.lora_int_id}
    done = {}
    for _ in range(200):
        done.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    assert done["x"].outputs[0].token_ids == setup.reference(PROMPTS[0], 0)
    assert done["y"].outputs[0].token_ids == setup.reference(PROMPTS[1], 2)
