"""CUDA-graph decode on a GPU: greedy tokens of graph replays equal the eager engine's, on a
tiny model of each architecture and on the demo model with its adapters, with and without
LoRA, in mixed batches, with adapters swapped, unloaded and reloaded between replays (one
slot: every swap rewrites it), and with a batch padded up to a graph size.

Exact token equality needs the same kernels on both sides: in float32 a padded batch (3
sequences -> graph 4) runs matmuls of another shape than the eager step but rounds far
below the logit gaps; in bfloat16 the batches are ladder sizes (1, 4) so the shapes match.
"""
import pytest

from tests.entrypoints.lora_adapters import make_peft_adapter
from tests.entrypoints.tiny_models import tiny_model_dir
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["hello world", "abc", "the quick brown fox", "xyz 123"]


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "olmoe", "mixtral"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    path, hf, _ = tiny_model_dir(request.param, folder / "model")
    adapters = [LoRARequest(f"a{i}", i + 1, make_peft_adapter(hf, folder / f"a{i}", rank=4, seed=30 + i))
                for i in range(2)]
    return path, adapters


def _pair(path, **kw):
    """(eager engine, graph engine) with the same arguments."""
    args = dict(max_model_len=128, block_size=4, num_gpu_blocks_override=256, max_num_seqs=16)
    args.update(kw)
    eager, graphs = LLM(path, enforce_eager=True, **args), LLM(path, **args)
    assert eager.llm_engine.runner.graphs is None
    assert graphs.llm_engine.runner.graphs is not None, "CUDA graphs are not on by default on a GPU"
    return eager, graphs


def _tokens(llm, prompts, loras=None):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)]


def _replays(llm, key):
    return llm.llm_engine.runner.graphs.replays[key]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_match_eager_without_lora(tiny, dtype):
    eager, graphs = _pair(tiny[0], dtype=dtype)
    prompts = PROMPTS[:3] if dtype == "float32" else PROMPTS
    size = 4
    assert _tokens(graphs, prompts) == _tokens(eager, prompts)
    assert _replays(graphs, (size, False)) == GREEDY.max_tokens - 1
    assert _tokens(graphs, PROMPTS[:1]) == _tokens(eager, PROMPTS[:1])
    assert _replays(graphs, (1, False)) > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphs_match_eager_with_lora_mixed_batches(tiny, dtype):
    path, (a0, a1) = tiny
    # max_lora_rank above the adapters' rank 4 (the kernels run at the adapters' rank)
    eager, graphs = _pair(path, dtype=dtype, enable_lora=True, max_loras=2, max_lora_rank=8)
    plans = [[None, a0, a1, a0], [None, None, None, None], [a1, a1, None, a0]]
    if dtype == "float32":
        plans = [p[:3] for p in plans]  # padded: 3 sequences -> graph 4
    outs = []
    for loras in plans:
        want = _tokens(eager, PROMPTS[:len(loras)], loras)
        assert _tokens(graphs, PROMPTS[:len(loras)], loras) == want, loras
        outs.append(want)
    assert outs[0] != outs[1]  # the adapters change the outputs
    assert _replays(graphs, (4, True)) > 0 and _replays(graphs, (4, False)) > 0
    # the LoRA-enabled engine on a base-only batch equals an engine without LoRA
    base_eager = LLM(path, enforce_eager=True, dtype=dtype, max_model_len=128, block_size=4,
                     num_gpu_blocks_override=256, max_num_seqs=16)
    assert _tokens(base_eager, PROMPTS[:len(plans[1])]) == outs[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_adapters_swapped_unloaded_and_reloaded_between_replays(dtype):
    upper = LoRARequest("upper", 1, "examples/demo_adapters/upper")
    rot13 = LoRARequest("rot13", 2, "examples/demo_adapters/rot13")
    # max_loras=1: one slot, rewritten at every swap; demo adapters are r=4 (gate_up 8)
    eager, graphs = _pair("examples/demo_model", dtype=dtype, enable_lora=True, max_loras=1, max_lora_rank=8,
                          max_model_len=64)
    words = ["hello", "graph", "world", "token"]
    if dtype == "float32":
        words = words[:3]
    prompts = [f"{w}=" for w in words]
    n = len(prompts)
    plan = [[upper] * n, [rot13, None, rot13, None][:n], [None] * n, [upper, None, None, upper][:n]]
    for step, loras in enumerate(plan + plan[:2]):
        assert _tokens(graphs, prompts, loras) == _tokens(eager, prompts, loras), (step, loras)
        if step == 2:
            for llm in (eager, graphs):  # unload both: their next use loads them again into the slot
                llm.llm_engine.remove_lora(upper.lora_int_id)
                llm.llm_engine.remove_lora(rot13.lora_int_id)
    assert _replays(graphs, (4, True)) > 0 and _replays(graphs, (4, False)) > 0


def test_prefills_and_big_batches_stay_eager(tiny):
    path, _ = tiny
    llm = LLM(path, max_model_len=128, block_size=4, num_gpu_blocks_override=256, max_num_seqs=16,
              cuda_graph_sizes=[1, 2])
    g = llm.llm_engine.runner.graphs
    assert g.sizes == [1, 2]
    eager = LLM(path, enforce_eager=True, max_model_len=128, block_size=4, num_gpu_blocks_override=256,
                max_num_seqs=16)
    assert _tokens(llm, PROMPTS[:3]) == _tokens(eager, PROMPTS[:3])  # 3 > 2: eager throughout
    assert sum(g.replays.values()) == 0
    assert _tokens(llm, PROMPTS[:2]) == _tokens(eager, PROMPTS[:2])
    assert g.replays[(2, False)] == GREEDY.max_tokens - 1  # the prefill ran eagerly
    assert g.graph_memory_bytes >= 0 and g.capture_seconds > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt_oss_mxfp4_graphs_match_eager_with_lora(tmp_path, dtype):
    """gpt-oss as released (MXFP4 experts: UnfusedOAITritonExperts; sinks, sliding window), with adapters."""
    from tests.models.test_gpt_oss_mxfp4 import _mxfp4_checkpoint

    hf = _mxfp4_checkpoint(tmp_path)
    a0, a1 = [LoRARequest(f"a{i}", i + 1, make_peft_adapter(hf, tmp_path / f"a{i}", rank=4, seed=40 + i,
                                                              dense_mlp=False)) for i in range(2)]
    eager, graphs = _pair(str(tmp_path), dtype=dtype, enable_lora=True, max_loras=2, max_lora_rank=8)
    n = 3 if dtype == "float32" else 4
    for loras in ([None, a0, a1, a0][:n], [None] * n):
        assert _tokens(graphs, PROMPTS[:n], loras) == _tokens(eager, PROMPTS[:n], loras), loras
    kinds = {type(k.fused_experts).__name__ for m in graphs.llm_engine.model.modules()
             if (k := getattr(getattr(m, "quant_method", None), "kernel", None)) is not None}
    assert kinds == {"UnfusedOAITritonExperts"}, kinds
    assert _replays(graphs, (4, True)) > 0 and _replays(graphs, (4, False)) > 0
