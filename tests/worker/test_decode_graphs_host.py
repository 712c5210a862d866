"""The host side of CUDA-graph decode, on CPU: the size ladder, the static buffers after a
step's inputs are copied in, which graph a step picks, the eager fallback, which LoRA ops a
captured step holds, and whole generations through the emulated graph runner (same forward
over the static buffers, run eagerly) against the eager engine, with adapters swapped."""
import pytest
import torch

from tests.entrypoints.lora_adapters import make_peft_adapter
from tests.entrypoints.tiny_models import tiny_model_dir
from tests.models.hf_checkpoints import single_thread  # noqa: F401  (fixture)
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.worker.cuda_graphs import (DecodeBuffers, DecodeGraphRunner, capture_sizes, graph_blockers,
                                     padded_size)
from vllm.worker.model_runner import ModelInput

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["hello world", "abc", "the quick brown fox"]


def test_capture_sizes_ladder_and_custom():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert capture_sizes(3) == [1, 2, 3]  # max_num_seqs itself: every decode batch fits a graph
    assert capture_sizes(100)[-2:] == [96, 100]
    assert capture_sizes(2048)[-1] == 512  # capped: bigger batches run eagerly
    assert capture_sizes(64, [16, 1, 16, 128]) == [1, 16]
    for bad in ([], [0], [2, -1], [1.5], [True]):
        with pytest.raises(ValueError, match="positive integers"):
            capture_sizes(8, bad)


def test_padded_size():
    sizes = capture_sizes(64)
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 16, 17, 25, 64)] == [1, 2, 4, 8, 16, 24, 32, 64]
    assert padded_size(65, sizes) is None


def test_buffers_after_prepare_hold_the_step_and_padding():
    b = DecodeBuffers(max_size=8, max_blocks=5, block_size=4, device="cpu")
    b.allocate()
    b.prepare([7, 8, 9], [4, 9, 0], [17, 38, 20], [5, 10, 1], [[4], [2, 9, 3], [5]], 4)
    ids, pos, slots = b.views(4)
    assert ids.tolist() == [7, 8, 9, 0] and pos.tolist() == [4, 9, 0, 0]
    assert slots.tolist() == [17, 38, 20, -1]  # padding row: no KV write
    meta = b.metadata(4)
    assert meta.seq_lens.tolist() == [5, 10, 1, 1] and meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables.shape == (4, 5) and meta.block_tables[:3, :3].tolist() == [[4, 0, 0], [2, 9, 3],
                                                                                           [5, 0, 0]]
    assert meta.num_tokens == meta.num_seqs == 4 and meta.max_query_len == 1
    assert meta.slot_mapping.data_ptr() == slots.data_ptr()  # the graph reads the same memory
    # a smaller batch in the same size: the rows it no longer uses become padding
    b.prepare([5], [3], [11], [4], [[2]], 4)
    assert b.views(4)[2].tolist() == [11, -1, -1, -1] and b.metadata(4).seq_lens.tolist() == [4, 1, 1, 1]
    assert b.views(4)[0].tolist() == [5, 0, 0, 0]
    with pytest.raises(ValueError, match="exceeds the 5"):
        b.prepare([1], [0], [0], [1], [[0] * 6], 1)
    with pytest.raises(ValueError, match="at most 2"):
        b.prepare([1, 2, 3], [0] * 3, [0] * 3, [1] * 3, [[0]] * 3, 2)


class _FakeLoRA:
    punica_wrapper = None


def _runner(lora=False, sizes=(1, 2, 4)) -> DecodeGraphRunner:
    return DecodeGraphRunner(torch.nn.Identity(), block_size=4, max_model_len=32, max_num_seqs=8, device="cpu",
                             lora_manager=_FakeLoRA() if lora else None, sizes=sizes, emulate=True)


def _inp(query_lens, lora_ids=None, prompt_rows=()):
    n = sum(query_lens)
    return ModelInput(list(range(n)), list(range(n)), list(query_lens), list(query_lens),
                      [[0]] * len(query_lens), list(range(n)), lora_ids, list(prompt_rows))


def test_graph_key_pads_and_falls_back_to_eager():
    r = _runner()
    assert r.keys == [(1, False), (2, False), (4, False)]
    assert r.graph_key(_inp([1, 1, 1])) == (4, False)
    assert r.graph_key(_inp([1])) == (1, False)
    assert r.graph_key(_inp([1] * 5)) is None  # more sequences than the largest graph
    assert r.graph_key(_inp([3, 1])) is None  # a prefill
    assert r.graph_key(_inp([1, 1], prompt_rows=[0])) is None  # prompt logprobs
    assert r.graph_key(_inp([])) is None
    lr = _runner(lora=True)
    assert len(lr.keys) == 6
    assert lr.graph_key(_inp([1, 1, 1], [0, 0, 0])) == (4, False)  # no adapter in the batch
    assert lr.graph_key(_inp([1, 1, 1], [0, 2, 0])) == (4, True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    path, hf, _ = tiny_model_dir("qwen3_moe", folder / "model")
    adapters = [LoRARequest(f"a{i}", i + 1, make_peft_adapter(hf, folder / f"a{i}", rank=4, seed=20 + i))
                for i in range(2)]
    return path, adapters


def _llm(path, **kw):
    # enforce_eager: on a GPU machine the engine would capture real graphs; these tests attach an emulated runner
    return LLM(path, max_model_len=64, block_size=4, num_gpu_blocks_override=128, max_num_seqs=8,
               enforce_eager=True, **kw)


def _attach(llm, sizes=None) -> DecodeGraphRunner:
    eng = llm.llm_engine
    w = eng.executor.driver
    assert eng.runner.graphs is None  # enforce_eager
    if w.device.type == "cpu":  # a CPU engine would run eagerly by itself too
        assert any("not CUDA" in r for r in graph_blockers(w.model, w.device, 1))
    g = DecodeGraphRunner(w.model, block_size=eng.cache_config.block_size,
                          max_model_len=eng.scheduler_config.max_model_len,
                          max_num_seqs=eng.scheduler_config.max_num_seqs, device=w.device,
                          lora_manager=w.lora_manager, sizes=sizes, emulate=True)
    g.capture()
    eng.runner.graphs = g
    return g


def _tokens(llm, prompts, loras=None):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=loras, use_tqdm=False)]


def test_captured_steps_hold_lora_ops_exactly_for_lora_keys(setup, monkeypatch):
    # the dense layers' LoRA through the Punica wrapper (on a GPU they would fuse it into the projection)
    monkeypatch.setenv("VLLM_FUSED_LORA_LINEAR", "0")
    llm = _llm(setup[0], enable_lora=True, max_loras=2, max_lora_rank=8)
    g = _attach(llm, sizes=[2])
    punica = llm.llm_engine.lora_manager.punica_wrapper
    calls = []
    for name in ("add_lora_linear", "add_lora_w13"):
        orig = getattr(punica, name)
        monkeypatch.setattr(punica, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    with torch.inference_mode():  # as in capture and in the model runner
        g._set_dummy_inputs(2)  # what capture sees: no adapter loaded, every token on the base model
        g._forward(2, lora=False)
        assert calls == []
        g._forward(2, lora=True)
        assert "add_lora_linear" in calls and "add_lora_w13" in calls
        calls.clear()
        g._forward(2, lora=False)  # the flag does not stick
        assert calls == []


def test_emulated_graphs_match_eager_with_padding(setup, single_thread):  # noqa: F811
    path, _ = setup
    llm = _llm(path)
    eager = _tokens(llm, PROMPTS)
    g = _attach(llm)
    assert _tokens(llm, PROMPTS) == eager
    assert g.replays[(4, False)] == GREEDY.max_tokens - 1  # 3 sequences padded to 4; the first token is the prefill's
    assert _tokens(llm, PROMPTS[:1]) == eager[:1] and g.replays[(1, False)] > 0


def test_emulated_graphs_match_eager_across_adapter_swaps(setup, single_thread):  # noqa: F811
    path, adapters = setup
    a0, a1 = adapters
    llm = _llm(path, enable_lora=True, max_loras=1, max_lora_rank=8)  # one slot: every swap reuses it
    plan = [[a0, None, a0], [a1, a1, None], [None, None, None], [a0, a0, a0]]
    eager = [_tokens(llm, PROMPTS, loras) for loras in plan]
    assert eager[0] != eager[2] and eager[1] != eager[2]  # the adapters change the outputs
    g = _attach(llm)
    for loras, want in zip(plan, eager):
        assert _tokens(llm, PROMPTS, loras) == want
    assert llm.llm_engine.remove_lora(a0.lora_int_id)  # unloaded: its slot cleared, then loaded again
    assert _tokens(llm, PROMPTS, plan[0]) == eager[0]
    assert g.replays[(4, True)] > 0 and g.replays[(4, False)] > 0


def test_a_failed_capture_leaves_an_eager_engine(setup, monkeypatch, caplog, single_thread):  # noqa: F811
    """A capture that raises (the step it records fails; on a CPU the capture fails even earlier, there is
    no CUDA) is logged as a warning; the engine starts without graphs and generates as the eager one."""
    import vllm.worker.cuda_graphs as cg

    path, adapters = setup
    eager = _tokens(_llm(path, enable_lora=True, max_loras=1, max_lora_rank=8), PROMPTS, [adapters[0], None, None])
    monkeypatch.setattr(cg, "graph_blockers", lambda *a, **k: [])

    def broken_step(self, *a, **k):
        raise RuntimeError("an op that cannot be captured")

    monkeypatch.setattr(cg.DecodeGraphRunner, "_forward", broken_step)
    with caplog.at_level("WARNING"):
        llm = LLM(path, max_model_len=64, block_size=4, num_gpu_blocks_override=128, max_num_seqs=8,
                  enable_lora=True, max_loras=1, max_lora_rank=8)
    assert llm.llm_engine.runner.graphs is None
    assert any("capture failed" in r.getMessage() and "runs eagerly" in r.getMessage() for r in caplog.records)
    assert _tokens(llm, PROMPTS, [adapters[0], None, None]) == eager
