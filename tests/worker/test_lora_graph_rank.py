"""LoRA decode graphs and the layers' kernel rank (the rank of the adapters in their slots, not max_lora_rank:
``vllm.lora.layers.effective_rank``), on CPU through the emulated graph runner.

A real graph bakes each LoRA launch's rank and buffer views in.  The emulation here does the same: each
"graph" keeps the views (dense ``lora_a_stacked`` / ``lora_b_stacked``, the MoE layers' ``MoELoRAContext``)
its capture saw, and its replays run with them.  So a graph captured while rank-8 adapters were loaded that
replayed after a rank-16 adapter arrived would drop the adapter's columns past 8 and change the tokens;
the kernel-rank change must change the LoRA layer set's version, which re-captures the graph first.

On the tiny Qwen3-MoE with max_lora_rank 32 and peft adapters of rank 8 and 16 on attention and the fused
experts: tokens against transformers + peft, and graphs against the
eager engine as a rank-16 adapter is loaded into a second slot and unloaded again.
"""
import pytest

from tests.entrypoints.lora_adapters import greedy, make_peft_adapter, peft_model
from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from tests.worker.test_decode_graphs_host import GREEDY, PROMPTS, _attach, _llm, _tokens
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA
from vllm.lora.request import LoRARequest

LORA = dict(enable_lora=True, max_lora_rank=32)
QKV = "model.layers.0.self_attn.qkv_proj"
EXPERTS = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph_rank")
    path, hf, tok = tiny_model_dir("qwen3_moe", folder / "model")
    paths = {name: make_peft_adapter(hf, folder / name, rank=r, seed=60 + i, dense_mlp=False)
             for i, (name, r) in enumerate([("r8", 8), ("r8b", 8), ("r16", 16)])}
    return path, hf, tok, paths, {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(paths.items())}


def _bake_views(llm, g, monkeypatch) -> None:
    """Make the emulated graphs keep the LoRA views of their capture, as real graphs do (see the module
    docstring): a replay runs with the views its graph was captured with."""
    mods = llm.llm_engine.lora_manager.modules

    def snapshot():
        return {n: w.base_layer.lora_context if isinstance(w, FusedMoEWithLoRA) else (w.lora_a_stacked,
                                                                                     w.lora_b_stacked)
                for n, w in mods.items()}

    def put(snap):
        for n, w in mods.items():
            if isinstance(w, FusedMoEWithLoRA):
                w.base_layer.set_lora_context(snap[n])
            else:
                w.lora_a_stacked, w.lora_b_stacked = snap[n]

    baked = {key: snapshot() for key in g._graphs}  # the start-up capture
    capture_one, forward, capturing = g._capture_one, g._forward, []

    def capture(p, lora):
        capturing.append(1)
        try:
            capture_one(p, lora)
        finally:
            capturing.clear()
        baked[(p, lora)] = snapshot()

    def replay(p, lora, *a, **k):
        if capturing or (p, lora) not in baked:
            return forward(p, lora, *a, **k)
        now = snapshot()
        put(baked[(p, lora)])
        try:
            return forward(p, lora, *a, **k)
        finally:
            put(now)

    monkeypatch.setattr(g, "_capture_one", capture)
    monkeypatch.setattr(g, "_forward", replay)


def test_adapters_of_two_ranks_match_peft(setup, single_thread):  # noqa: F811
    """max_lora_rank 32, a batch of the base model, a rank-8 and a rank-16 adapter: attention and the experts
    run at rank 16 (not 32); tokens equal peft's; unloading the rank-16 adapter lowers them."""
    path, hf, tok, paths, ad = setup
    llm = _llm(path, max_loras=2, **LORA)
    which = [None, "r8", "r16"]
    got = _tokens(llm, PROMPTS, [None if w is None else ad[w] for w in which])
    n = GREEDY.max_tokens
    for prompt, w, out in zip(PROMPTS, which, got):
        model = hf if w is None else peft_model(hf, paths[w])
        assert out == greedy(model, tok, prompt, n), (prompt, w)
    mods = llm.llm_engine.lora_manager.modules
    assert mods[QKV].kernel_rank == 16 and mods[EXPERTS].kernel_ranks == (16, 16)
    assert llm.llm_engine.remove_lora(ad["r16"].lora_int_id)  # its slot is cleared by the next step
    assert _tokens(llm, PROMPTS[1:2], [ad["r8"]]) == got[1:2]
    assert mods[QKV].kernel_rank == 8 and mods[EXPERTS].kernel_ranks == (8, 8)


def test_a_larger_adapter_recaptures_and_matches_eager(setup, single_thread):  # noqa: F811
    """Rank-8 adapters when the graphs are (re)captured; then a rank-16 adapter into the other slot: the kernel
    ranks grow, the version changes, the graph is captured again, tokens equal eager; unloading it lowers the
    ranks and re-captures again; a rank-8 swap changes nothing."""
    path, _, _, _, ad = setup
    plan = [[ad["r8"], None, ad["r8"]], [ad["r8"], ad["r16"], None], [ad["r8"], ad["r8b"], ad["r8"]]]
    eager_llm = _llm(path, max_loras=2, **LORA)
    eager = [_tokens(eager_llm, PROMPTS, loras) for loras in plan]
    assert eager[1][1] != _tokens(eager_llm, PROMPTS[1:2], [ad["r8b"]])[0]  # the rank-16 adapter shows

    llm = _llm(path, max_loras=2, **LORA)
    g = _attach(llm, sizes=[4])
    _bake_views(llm, g, monkeypatch := pytest.MonkeyPatch())
    punica = llm.llm_engine.lora_manager.punica_wrapper
    mods = llm.llm_engine.lora_manager.modules
    try:
        assert _tokens(llm, PROMPTS, plan[0]) == eager[0]
        assert g.recaptures == 1 and mods[QKV].kernel_rank == 8 and mods[EXPERTS].kernel_ranks == (8, 8)
        version = punica.lora_layer_set.version
        assert _tokens(llm, PROMPTS, plan[1]) == eager[1]
        assert punica.lora_layer_set.version > version and g.recaptures == 2
        assert mods[QKV].kernel_rank == 16 and mods[EXPERTS].kernel_ranks == (16, 16)
        assert llm.llm_engine.remove_lora(ad["r16"].lora_int_id)  # unloaded (by the next step): the ranks drop
        assert _tokens(llm, PROMPTS, plan[0]) == eager[0] and g.recaptures == 3
        assert mods[QKV].kernel_rank == 8 and mods[EXPERTS].kernel_ranks == (8, 8)
        version = punica.lora_layer_set.version
        assert _tokens(llm, PROMPTS, plan[2]) == eager[2]  # another rank-8 adapter: same ranks, same graph
        assert punica.lora_layer_set.version == version and g.recaptures == 3
        assert g.replays[(4, True)] > 0
    finally:
        monkeypatch.undo()
