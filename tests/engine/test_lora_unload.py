"""Issue 9, finding 7: unloading an adapter that requests are using (demo model and adapters).

Semantics (``LLMEngine.remove_lora``): requests added before finish on the weights they
started with; new requests for the adapter are refused until it is added again; an
unloaded adapter is never read from its folder behind the user's back.  To tell a re-read
from the cached weights, the adapter's folder is overwritten with another adapter (or
deleted) right after the unload.
"""
import asyncio
import os
import shutil

import pytest

from tests.utils import run_to_completion
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.engine.llm_engine import LLMEngine
from vllm.lora.request import LoRARequest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
MODEL = os.path.join(ROOT, "demo_model")
UPPER, ROT13 = os.path.join(ROOT, "demo_adapters", "upper"), os.path.join(ROOT, "demo_adapters", "rot13")
PROMPT = "hello world="
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _args(**kw):
    return EngineArgs(MODEL, **{**dict(enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=64), **kw})


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(_args())


@pytest.fixture(scope="module")
def reference(engine):
    """Uninterrupted greedy tokens of PROMPT on each adapter (and base)."""
    out = {}
    for name, path, lid in (("upper", UPPER, 101), ("rot13", ROT13, 102)):
        engine.add_request(f"ref-{name}", PROMPT, GREEDY, lora_request=LoRARequest(name, lid, path))
        out[name] = run_to_completion(engine)[f"ref-{name}"].outputs[0].token_ids
        engine.remove_lora(lid)
    assert out["upper"] != out["rot13"]
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _replace(folder, src):
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), os.path.join(folder, name))


def _assert_dropped(engine, lid):
    assert lid not in engine.lora_manager.list_adapters() and lid not in engine.loras.draining
    assert not engine.loras._users
    engine.scheduler.block_manager.check_no_leaks()


@pytest.mark.parametrize("after_unload", ["overwrite", "delete"])
def test_unload_during_a_run_finishes_on_the_weights_it_started_with(engine, reference, tmp_path, after_unload):
    folder = _copy(UPPER, tmp_path / "a")
    req = LoRARequest("a", 1, folder)
    engine.add_request("r1", PROMPT, GREEDY, lora_request=req)
    engine.add_request("r2", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2),
                       lora_request=req)
    engine.add_request("base", PROMPT, GREEDY)
    done = {o.request_id: o for _ in range(3) for o in engine.step() if o.finished}
    assert engine.remove_lora(1) is True
    assert engine.remove_lora(1) is False  # already unloaded
    if after_unload == "overwrite":
        _replace(folder, ROT13)
    else:
        shutil.rmtree(folder)
    done.update(run_to_completion(engine))
    assert done["r1"].error is None and done["r1"].outputs[0].token_ids == reference["upper"]
    assert [c.token_ids for c in done["r2"].outputs] == [reference["upper"]] * 2
    assert done["base"].error is None
    _assert_dropped(engine, 1)


def test_new_requests_for_an_unloaded_adapter(engine, reference, tmp_path):
    """While its old requests finish, the unloaded adapter is refused (same id); afterwards a request
    that carries its LoRARequest loads it again, from the folder (a user action, allowed)."""
    folder = _copy(UPPER, tmp_path / "b")
    req = LoRARequest("b", 2, folder)
    engine.add_request("old", PROMPT, GREEDY, lora_request=req)
    engine.step()
    engine.remove_lora(2)
    _replace(folder, ROT13)
    with pytest.raises(ValueError, match=r"'b' \(lora_int_id 2\) is not loaded: it was unloaded.*1 request"):
        engine.add_request("new", PROMPT, GREEDY, lora_request=req)
    with pytest.raises(ValueError, match="is not loaded"):
        engine.add_lora(req)
    assert "new" not in engine._requests
    # the same folder under a new id is another adapter: loaded now, with the folder's new weights
    engine.add_request("other-id", PROMPT, GREEDY, lora_request=LoRARequest("b2", 3, folder))
    done = run_to_completion(engine)
    assert done["old"].outputs[0].token_ids == reference["upper"]
    assert done["other-id"].outputs[0].token_ids == reference["rot13"]
    _assert_dropped(engine, 2)
    # drained: a request carrying the LoRARequest is an explicit load again (the folder as it is now)
    engine.add_request("again", PROMPT, GREEDY, lora_request=req)
    assert run_to_completion(engine)["again"].outputs[0].token_ids == reference["rot13"]
    engine.remove_lora(2)
    engine.remove_lora(3)
    _assert_dropped(engine, 2)


def test_aborting_the_last_request_drops_an_unloaded_adapter(engine, tmp_path):
    req = LoRARequest("c", 4, _copy(UPPER, tmp_path / "c"))
    engine.add_request("x", PROMPT, GREEDY, lora_request=req)
    engine.step()
    engine.remove_lora(4)
    assert 4 in engine.lora_manager.list_adapters()  # still used by "x"
    engine.abort_request("x")
    _assert_dropped(engine, 4)


def test_an_adapter_in_use_is_never_evicted_from_the_cpu_cache(reference, tmp_path):
    """max_cpu_loras=1: loading a second adapter while the first one's request waits must not evict
    the first (it would have to be read from its folder again - here deleted - mid-request)."""
    eng = LLMEngine(_args(max_cpu_loras=1, max_loras=1))
    first = LoRARequest("first", 1, _copy(UPPER, tmp_path / "first"))
    eng.add_request("a", PROMPT, GREEDY, lora_request=first)
    eng.add_request("b", PROMPT, GREEDY, lora_request=LoRARequest("second", 2, ROT13))
    shutil.rmtree(first.lora_path)
    done = run_to_completion(eng)
    assert done["a"].error is None and done["a"].outputs[0].token_ids == reference["upper"]
    assert done["b"].outputs[0].token_ids == reference["rot13"]
    # with nothing in flight the cache is back to its capacity on the next load
    eng.add_lora(LoRARequest("third", 3, UPPER))
    assert list(eng.lora_manager.list_adapters()) == [3]


def test_async_unload_during_a_stream(reference, tmp_path):
    eng = AsyncLLMEngine.from_engine_args(_args())
    folder = _copy(UPPER, tmp_path / "d")
    req = LoRARequest("d", 1, folder)

    async def main():
        outs = []
        async for out in eng.generate(PROMPT, GREEDY, lora_request=req):
            outs.append(out)
            if len(outs) == 2:
                assert await eng.remove_lora(1) is True
                shutil.rmtree(folder)
        return outs[-1]

    try:
        last = asyncio.run(asyncio.wait_for(main(), 60))
        assert last.error is None and last.outputs[0].token_ids == reference["upper"]
    finally:
        eng.shutdown()
