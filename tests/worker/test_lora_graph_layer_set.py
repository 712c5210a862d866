"""LoRA decode graphs launch only the layers some adapter targets (the Punica wrapper's LoRA layer set), on
CPU through the emulated graph runner (its replays run the forward with the layer set the "graph" was
captured with, so a stale graph misses a new layer's delta as a real one would).

On the tiny Qwen3-MoE (layer 0: dense MLP; layer 1: router ``mlp.gate`` + experts) with adapters that
target attention only, attention + experts, and attention + experts + the router: which LoRA ops a graph
step launches, tokens identical to eager as adapters targeting new layers arrive between steps (each
version of the set re-captures the LoRA graphs once), no re-capture for swaps with the same targets, and
an empty layer set.  ``tests/worker/test_cuda_graphs.py``-style real graphs: the ``cuda`` tests below.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.entrypoints.lora_adapters import make_peft_adapter
from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.worker.test_decode_graphs_host import PROMPTS, _attach, _llm, _tokens
from vllm import LLM
from vllm.lora.layers import dense_handoff
from vllm.lora.request import LoRARequest
from vllm.worker.model_runner import ModelInput

GATE = "model.layers.1.mlp.gate"
LORA = dict(enable_lora=True, max_lora_rank=8)


def _subset(src: str, dst, keep) -> str:
    """A copy of adapter ``src`` with only the tensors whose key ``keep`` accepts."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "adapter_config.json"), dst)
    tensors = {k: v for k, v in load_file(os.path.join(src, "adapter_model.safetensors")).items() if keep(k)}
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    return str(dst)


def _with_router(src: str, dst, hidden: int, experts: int, seed: int) -> str:
    """A copy of adapter ``src`` that also targets the MoE router (lora_A [r, H], lora_B [E, r])."""
    _subset(src, dst, lambda k: True)
    path = os.path.join(dst, "adapter_model.safetensors")
    tensors = load_file(path)
    r = json.load(open(os.path.join(dst, "adapter_config.json")))["r"]
    gen = torch.Generator().manual_seed(seed)
    tensors[f"base_model.model.{GATE}.lora_A.weight"] = torch.randn(r, hidden, generator=gen) / hidden**0.5
    tensors[f"base_model.model.{GATE}.lora_B.weight"] = torch.randn(experts, r, generator=gen)
    save_file(tensors, path)
    return str(dst)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layer_set")
    path, hf, _ = tiny_model_dir("qwen3_moe", folder / "model")
    full = make_peft_adapter(hf, folder / "full", rank=4, seed=50, dense_mlp=False)  # q/k/v/o + experts
    same = make_peft_adapter(hf, folder / "same", rank=4, seed=51, dense_mlp=False)  # same targets
    attn = _subset(full, folder / "attn", lambda k: ".self_attn." in k)
    router = _with_router(full, folder / "router", hf.config.hidden_size, hf.config.num_experts, seed=52)
    return path, {name: LoRARequest(name, i + 1, p)
                  for i, (name, p) in enumerate([("full", full), ("same", same), ("attn", attn), ("router", router)])}


def _names(llm):
    """id of each LoRA layer's buffers / enabled_slots -> its module name."""
    mgr = llm.llm_engine.lora_manager
    by_id = {}
    for name, w in mgr.modules.items():
        by_id[id(w.enabled_slots)] = name
        if hasattr(w, "lora_a_stacked"):
            by_id[id(w.lora_a_stacked)] = name
    return by_id


def _record_graph_launches(llm, g, monkeypatch) -> list[set[str]]:
    """Per LoRA graph step (emulated replay or capture), the names of the layers that launched a LoRA op."""
    punica = llm.llm_engine.lora_manager.punica_wrapper
    by_id, steps, inside = _names(llm), [], []
    by_layer = {id(w): name for name, w in llm.llm_engine.lora_manager.modules.items()}
    linear, w13, forward = punica.add_lora_linear, punica.add_lora_w13, g._forward
    make_pending = dense_handoff.make_pending

    def rec_linear(y, x, lora_a, *a, **k):
        if inside:
            steps[-1].add(by_id[id(lora_a)])
        return linear(y, x, lora_a, *a, **k)

    def rec_w13(y, x, ctx, **k):
        if inside:
            steps[-1].add(by_id[id(ctx.enabled_slots)])
        return w13(y, x, ctx, **k)

    def rec_pending(layer, x):  # the dense LoRA handoff: the delta is launched by the fused ops around the layer
        pending = make_pending(layer, x)
        if inside and pending is not None:
            steps[-1].add(by_layer[id(layer)])
        return pending

    def rec_forward(p, lora, *a, **k):
        if lora:
            steps.append(set())
            inside.append(1)
        try:
            return forward(p, lora, *a, **k)
        finally:
            inside.clear()

    monkeypatch.setattr(punica, "add_lora_linear", rec_linear)
    monkeypatch.setattr(punica, "add_lora_w13", rec_w13)
    monkeypatch.setattr(g, "_forward", rec_forward)
    monkeypatch.setattr(dense_handoff, "make_pending", rec_pending)
    return steps


@pytest.mark.parametrize("handoff", [False, True], ids=["own-add", "handoff"])
def test_lora_graph_steps_launch_only_targeted_layers(setup, monkeypatch, single_thread, handoff):  # noqa: F811
    """The router (wrapped, like every linear kind) and layer 0's dense MLP are targeted by no adapter: a
    LoRA graph step launches the attention and expert LoRA ops only.  Before any adapter is activated the
    set is unknown and the start-up graphs launch every layer (so the first LoRA steps never wait).  The
    attention projections' deltas go through add_lora_linear, or (handoff, as on CUDA) to the fused ops."""
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "0")  # dense deltas through add_lora_linear
    monkeypatch.setattr(dense_handoff, "HANDOFF_ON_CPU", handoff)
    path, ad = setup
    llm = _llm(path, max_loras=2, **LORA)
    g = _attach(llm, sizes=[4])
    steps = _record_graph_launches(llm, g, monkeypatch)
    with torch.inference_mode():
        g._set_dummy_inputs(4)
        g._forward(4, True, layer_set=g._layer_sets[(4, True)])  # what a start-up graph holds
    everything = set(llm.llm_engine.lora_manager.modules)
    assert steps == [everything] and GATE in everything
    steps.clear()
    _tokens(llm, PROMPTS, [ad["full"], None, ad["full"]])
    assert g.recaptures == 1 and g.replays[(4, True)] == 7  # re-captured once, then replayed every decode step
    targeted = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("qkv_proj", "o_proj")}
    targeted.add("model.layers.1.mlp.experts")
    assert len(steps) == 1 + 7  # the re-capture's forward, then each replay
    assert all(s == targeted for s in steps), steps


def test_adapters_targeting_new_layers_recapture_and_match_eager(setup, caplog, single_thread):  # noqa: F811
    """Attention-only adapter, then attention + experts, then + the router: each new target layer changes
    the set's version; the next LoRA step re-captures (INFO once per version) and applies its delta."""
    path, ad = setup
    plan = [[ad["attn"], None, ad["attn"]], [ad["full"], ad["attn"], None], [None, ad["router"], ad["full"]]]
    eager_llm = _llm(path, max_loras=3, **LORA)
    eager = [_tokens(eager_llm, PROMPTS, loras) for loras in plan]
    # the new layers' deltas change the tokens (so a graph that misses them would show)
    assert _tokens(eager_llm, PROMPTS, [ad["attn"]] * 3) != _tokens(eager_llm, PROMPTS, [ad["full"]] * 3)
    assert _tokens(eager_llm, PROMPTS, [ad["full"]] * 3) != _tokens(eager_llm, PROMPTS, [ad["router"]] * 3)

    llm = _llm(path, max_loras=3, **LORA)
    _tokens(llm, PROMPTS[:1], [ad["attn"]])  # eagerly: the set is {attention} when the graphs are captured
    g = _attach(llm, sizes=[2, 4])
    punica = llm.llm_engine.lora_manager.punica_wrapper
    assert g._layer_sets[(4, True)].version == punica.lora_layer_set.version == 1
    with caplog.at_level("INFO", logger="vllm.worker.cuda_graphs"):
        assert _tokens(llm, PROMPTS, plan[0]) == eager[0]
        assert g.recaptures == 0  # same set: the captured graphs serve
        assert _tokens(llm, PROMPTS, plan[1]) == eager[1]
        assert punica.lora_layer_set.version == 2 and g.recaptures == 1
        assert _tokens(llm, PROMPTS, plan[2]) == eager[2]
        assert punica.lora_layer_set.version == 3 and g.recaptures == 2
        assert _tokens(llm, PROMPTS[1:], plan[2][1:]) == eager[2][1:]  # size 2: stale since version 2
        assert g.recaptures == 3 and set(g._layer_sets) == {(2, True), (4, True)}
    assert {ls.version for ls in g._layer_sets.values()} == {3}
    logs = [r.getMessage() for r in caplog.records if "LoRA layer set changed" in r.getMessage()]
    assert len(logs) == 2 and "version 2" in logs[0] and "version 3" in logs[1], logs


def test_swaps_with_the_same_targets_do_not_recapture(setup, single_thread):  # noqa: F811
    path, ad = setup
    plan = [[ad["full"], None, ad["full"]], [ad["same"], ad["same"], None], [ad["full"]] * 3]
    eager_llm = _llm(path, max_loras=1, **LORA)  # one slot: every swap rewrites it
    eager = [_tokens(eager_llm, PROMPTS, loras) for loras in plan]
    assert eager[0] != eager[1]
    llm = _llm(path, max_loras=1, **LORA)
    g = _attach(llm, sizes=[4])
    for loras, want in zip(plan, eager):
        assert _tokens(llm, PROMPTS, loras) == want
    assert llm.llm_engine.remove_lora(ad["full"].lora_int_id)  # unloaded, then loaded again
    assert _tokens(llm, PROMPTS, plan[0]) == eager[0]
    assert g.recaptures == 1  # once, when the first adapter made the set known
    assert llm.llm_engine.lora_manager.punica_wrapper.lora_layer_set.version == 1


def test_an_empty_layer_set_captures_a_graph_without_lora_ops(setup, monkeypatch, single_thread):  # noqa: F811
    """A known but empty set (activated adapters that target no wrapped layer): the LoRA graph is captured
    again with no LoRA op, and its logits equal the no-LoRA graph's."""
    path, _ = setup
    llm = _llm(path, max_loras=1, **LORA)
    g = _attach(llm, sizes=[2])
    punica = llm.llm_engine.lora_manager.punica_wrapper
    assert punica.add_lora_layers([]) and punica.lora_layer_set.members == frozenset()
    steps = _record_graph_launches(llm, g, monkeypatch)
    llm.llm_engine.lora_manager.set_adapter_mapping([0, 0])
    inp = ModelInput([5, 6], [0, 0], [1, 1], [1, 1], [[0], [1]], [0, 4], [0, 0], [])
    with torch.inference_mode():
        with_lora = g.run(inp, (2, True)).clone()
        base = g.run(inp, (2, False)).clone()
    assert g.recaptures == 1 and steps == [set(), set()]  # re-capture + replay, no LoRA op in either
    assert torch.equal(with_lora, base)


def test_a_failed_recapture_serves_the_step_and_then_runs_eagerly(setup, monkeypatch, caplog,
                                                                 single_thread):  # noqa: F811
    path, ad = setup
    plan = [[ad["full"], None, ad["full"]], [None, ad["router"], None]]
    eager_llm = _llm(path, max_loras=2, **LORA)
    eager = [_tokens(eager_llm, PROMPTS, loras) for loras in plan]
    llm = _llm(path, max_loras=2, **LORA)
    g = _attach(llm, sizes=[4])
    capture = g._capture_one

    def broken(p, lora):
        if g.recaptures:  # the start-up and the first re-capture worked
            raise RuntimeError("an op that cannot be captured")
        capture(p, lora)

    monkeypatch.setattr(g, "_capture_one", broken)
    assert _tokens(llm, PROMPTS, plan[0]) == eager[0] and g.recaptures == 1
    with caplog.at_level("WARNING", logger="vllm.worker.cuda_graphs"):
        assert _tokens(llm, PROMPTS, plan[1]) == eager[1]
    assert g.failed is not None and not g._graphs
    assert any("runs eagerly from now on" in r.getMessage() for r in caplog.records)
    assert g.graph_key(ModelInput([1], [0], [1], [1], [[0]], [0], [0], [])) is None


@pytest.mark.cuda
def test_real_graphs_recapture_for_new_layers_and_match_eager(setup):
    """On a GPU: real graphs (captured at start-up, version 0) re-captured as adapters targeting new layers
    arrive; tokens equal the eager engine's; a same-target swap re-captures nothing."""
    path, ad = setup
    kw = dict(max_model_len=64, block_size=4, num_gpu_blocks_override=128, max_num_seqs=8, max_loras=1, **LORA)
    eager, graphs = LLM(path, enforce_eager=True, **kw), LLM(path, **kw)
    g = graphs.llm_engine.runner.graphs
    assert g is not None and not g.emulate
    prompts = PROMPTS + ["xyz 123"]  # 4 sequences: a ladder size, the shapes of the eager steps
    plan = [[ad["attn"], None, ad["attn"], None], [ad["full"]] * 4, [ad["same"], None, None, ad["same"]],
            [None, ad["router"], ad["router"], None]]
    recaptures = []
    for loras in plan:
        assert _tokens(graphs, prompts, loras) == _tokens(eager, prompts, loras), loras
        recaptures.append(g.recaptures)
    assert recaptures == [1, 2, 2, 3]  # the same-target swap (step 3) kept the graph
    assert g.replays[(4, True)] > 0 and not g.failed


@pytest.mark.cuda
def test_real_lora_graph_capture_launches_only_targeted_layers(setup, monkeypatch):
    """On a GPU: the re-capture after the first adapter (its warm-up forward and the captured one) calls the
    LoRA ops of the attention and expert layers only, never the router's."""
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "0")  # dense deltas through add_lora_linear
    path, ad = setup
    llm = LLM(path, max_model_len=64, block_size=4, num_gpu_blocks_override=128, max_num_seqs=8, max_loras=1,
              **LORA)
    g = llm.llm_engine.runner.graphs
    assert g is not None and not g.emulate
    steps = _record_graph_launches(llm, g, monkeypatch)
    _tokens(llm, PROMPTS + ["xyz 123"], [ad["full"]] * 4)
    targeted = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("qkv_proj", "o_proj")}
    targeted.add("model.layers.1.mlp.experts")
    assert g.recaptures == 1 and steps == [targeted, targeted]  # replays run no Python
