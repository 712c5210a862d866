"""benchmarks/benchmark_decode.py's decode step (``steady_decode``): timed over engine steps of the whole batch in
decode, with the greedy tokens of the full requests; on CPU at the tiny preset, with and without LoRA."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_steady_decode_smoke(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    import benchmark_decode as bd

    a = SimpleNamespace(**bd.PRESETS["tiny"], preset="tiny", layers=2, num_loras=2, rank=8, prompt_len=16,
                        dtype="bfloat16")
    model_dir, adapters = bd.build_model_and_adapters(a, "decode_smoke_")
    prompts = bd.random_prompts(a, 3)
    monkeypatch.setattr(bd, "REPEATS", 1)
    common = dict(dtype=a.dtype, max_model_len=64, max_num_seqs=3, enforce_eager=True)
    for kw, loras in (({}, lambda b: None), (dict(enable_lora=True, max_loras=2, max_lora_rank=16),
                                             lambda b: [adapters[i % 2] for i in range(b)])):
        times, tokens = bd.run_engine(model_dir, common, [1, 3], prompts, loras, 5, **kw)
        for b in (1, 3):
            assert times[b] > 0 and times[("prefill", b)] > 0
            assert [len(t) for t in tokens[b]] == [5 + 4] * b  # steps + 4 tokens per request
    sys.modules.pop("benchmark_decode", None)
