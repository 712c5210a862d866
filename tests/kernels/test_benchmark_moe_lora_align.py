"""benchmarks/kernels/benchmark_moe_lora_align.py: its smoke run checks the one-pass align against the two
separate ones (and the fused virtual ids against torch) and reports every token count."""
from __future__ import annotations

import sys

import pytest

import benchmarks.kernels.benchmark_moe_lora_align as bench

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_smoke_run_checks_and_reports(tmp_path, device, monkeypatch):
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    from vllm.lora.ops.triton_ops import moe_lora_config as mc

    monkeypatch.setattr(mc, "SMALL_BATCH_PAIRS_FACTOR", 8)  # 9 tokens sort (upstream's factor; the default takes
    mc._cached_config.cache_clear()  # them per pair)
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_lora_align.py", "--smoke", "--tokens", "1", "9", "--out",
                                      str(out)])
    bench.main()
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 9 |")]
    assert len(rows) == 4  # both tables, both token counts
    assert rows[0].endswith("| no |") and rows[1].endswith("| yes |")  # 1 token: per-pair paths; 9: one pass
    mc._cached_config.cache_clear()


def test_a_differing_align_is_reported(device, monkeypatch):
    """The equality check is real: an align that differs stops the run before anything is timed."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    from vllm.lora.ops import moe_lora_align

    real = moe_lora_align.moe_align_with_lora

    def off_by_one(*args, **kwargs):
        base, lora = real(*args, **kwargs)
        lora.num_tokens_post_padded += 1
        return base, lora

    monkeypatch.setattr(moe_lora_align, "moe_align_with_lora", off_by_one)
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_lora_align.py", "--smoke", "--tokens", "9"])
    with pytest.raises(AssertionError, match="num_tokens_post_padded"):
        bench.main()


def test_chunk_table_checks_every_chunk(tmp_path, device, monkeypatch):
    """``--chunks``: every chunk size gives the torch path's alignments (checked before timing) and a row per
    token count; the module's chunk is restored afterwards."""
    if device.type == "cuda":
        pytest.skip("smoke mode runs on the CPU interpreter")
    from vllm.model_executor.layers.fused_moe.ops import moe_align_block_size as mab

    before = mab._CHUNK
    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["benchmark_moe_lora_align.py", "--smoke", "--tokens", "9", "--chunks", "16", "32",
                                      "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert "## Count / scatter chunk" in text
    assert any(line.startswith("| 9 |") and line.count("checked") == 2 for line in text.splitlines())
    assert mab._CHUNK == before

