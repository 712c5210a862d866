"""Expert parallelism over 2 processes (gloo on CPU, NCCL on CUDA) against one process and transformers + peft.

``enable_expert_parallel=True`` splits each MoE layer's experts over the tensor-parallel
ranks (E/2 whole experts each; attention and dense layers stay tensor-parallel).  For
each architecture, a mixed batch of base requests and 3 adapters (ranks 8, 4, 8 under
max_lora_rank 16; one adapter in the older per-expert layout) must give the greedy
tokens of the one-process engine and of transformers + peft: with EP, with EP and
fully sharded LoRA, and with adapters evicted and reloaded between steps.
"""
import pytest
import torch

from tests.distributed.test_tensor_parallel import ENGINE, GREEDY, PROMPTS, TP, Model, _tokens
from tests.entrypoints.lora_adapters import make_peft_adapter, to_per_expert_layout
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm import LLM
from vllm.lora.request import LoRARequest

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
WHICH = [None, 0, 1, 2, None]  # adapter per prompt: base requests and all three adapters in one batch
BATCH = PROMPTS + ["moe"]
LORA = dict(enable_lora=True, max_lora_rank=16)

if torch.cuda.is_available() and torch.cuda.device_count() < TP:
    pytest.skip(f"needs {TP} CUDA devices (or none: then it runs on CPU with gloo)", allow_module_level=True)


def _moe_layers(model):
    """(name, FusedMoE) of every MoE layer, through a LoRA wrapper when there is one."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoE

    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", mod)
        if isinstance(mod, FusedMoE) or (base is not mod and isinstance(base, FusedMoE)):
            yield name, base


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"{arch}_ep")
    m = Model(arch, folder / "model")
    m.arch = arch
    m.adapters = [make_peft_adapter(m.hf, folder / f"a{i}", rank=r, seed=30 + i) for i, r in enumerate([8, 4, 8])]
    cfg = m.hf.config
    m.num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    # the third adapter in the older per-expert layout (same deltas as the fused one peft reads)
    per_expert = to_per_expert_layout(m.adapters[2], str(folder / "a2_per_expert"), m.num_experts, cfg.hidden_size,
                                      inter, block, names)
    m.requests = [LoRARequest("a0", 1, m.adapters[0]), LoRARequest("a1", 2, m.adapters[1]),
                  LoRARequest("a2", 3, per_expert)]
    m.loras = [None if w is None else m.requests[w] for w in WHICH]
    m.expected = [m.reference(p, None if w is None else m.adapters[w]) for p, w in zip(BATCH, WHICH)]
    one = LLM(m.path, max_loras=4, **LORA, **{**ENGINE, "tensor_parallel_size": 1})
    try:
        m.one_rank = _tokens(one.generate(BATCH, GREEDY, lora_request=m.loras, use_tqdm=False))
    finally:
        one.llm_engine.shutdown()
    return m


def _check_expert_split(llm, m):
    """Rank 0 holds E/2 whole experts and, for the adapters, only their A and B; rank 1 the same."""
    engine = llm.llm_engine
    layers = list(_moe_layers(engine.model))
    assert layers
    for _, layer in layers:
        assert layer.local_num_experts == m.num_experts // TP
        assert layer.intermediate_size_per_partition == layer.moe_config.intermediate_size  # whole experts
        assert int((layer.expert_map >= 0).sum()) == m.num_experts // TP
    names = {name for name, _ in layers}
    cached = engine.lora_manager.list_adapters()
    workers = engine.executor.call_workers("call_lora_manager", "list_adapters")[0]
    for held in (cached, workers):
        assert held.keys() == cached.keys() and held
        for lora in held.values():
            moes = [w for n, w in lora.loras.items() if n in names]
            assert moes and all(w.num_experts == m.num_experts // TP for w in moes)
    # the two ranks hold different experts
    rank0 = set(next(iter(cached.values())).loras[sorted(names)[0]].expert_ids)
    rank1 = set(next(iter(workers.values())).loras[sorted(names)[0]].expert_ids)
    assert not rank0 & rank1 and len(rank0 | rank1) == m.num_experts


@pytest.mark.parametrize("fully_sharded", [False, True], ids=["ep", "ep_fully_sharded"])
def test_mixed_batch_matches_one_rank_and_peft(setup, fully_sharded):
    m = setup
    llm = LLM(m.path, enable_expert_parallel=True, max_loras=4, fully_sharded_loras=fully_sharded, **LORA, **ENGINE)
    try:
        got = _tokens(llm.generate(BATCH, GREEDY, lora_request=m.loras, use_tqdm=False))
        assert got == m.expected
        assert got == m.one_rank
        _check_expert_split(llm, m)
    finally:
        llm.llm_engine.shutdown()


def test_adapters_evicted_and_reloaded_between_steps(setup):
    """One slot and a CPU cache of two for three adapters: the mixed batch is split by the scheduler,
    slots change hands between steps and adapters are reloaded from disk (sliced again) on both ranks."""
    m = setup
    llm = LLM(m.path, enable_expert_parallel=True, max_loras=1, max_cpu_loras=2, **LORA, **ENGINE)
    engine = llm.llm_engine
    try:
        assert _tokens(llm.generate(BATCH, GREEDY, lora_request=m.loras, use_tqdm=False)) == m.expected
        for w in [2, 0, 1, 2]:
            out = llm.generate(BATCH[w + 1], GREEDY, lora_request=m.requests[w], use_tqdm=False)
            assert _tokens(out) == [m.expected[w + 1]], w
        assert len(engine.lora_manager.list_adapters()) <= 2
        assert engine.executor.call_workers("call_lora_manager", "list_adapters")[0].keys() == \
            engine.lora_manager.list_adapters().keys()
        _check_expert_split(llm, m)
    finally:
        engine.shutdown()


def test_expert_count_not_divisible_by_ep_size_fails_clearly(tmp_path):
    """qwen2_moe's 6 experts over 4 ranks: refused on rank 0, before any worker starts, naming the fix."""
    m = Model("qwen2_moe", tmp_path)
    with pytest.raises(ValueError, match=r"6 experts .*tensor_parallel_size=4.* not divisible.*\(2, 3, 6\)"):
        LLM(m.path, enable_expert_parallel=True, **{**ENGINE, "tensor_parallel_size": 4})
