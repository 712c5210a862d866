"""benchmarks/profile_decode.py --prefill (issue 10 goal 3: where a prefill's time goes): on CPU the smoke
run profiles one prefill of the batch per engine, without and with LoRA, after an unprofiled one."""
from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_prefill_profile_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    import profile_decode

    out = tmp_path / "prefill.md"
    assert profile_decode.main(["--preset", "tiny", "--layers", "2", "--batches", "3", "--prefill", "--modes",
                                "eager", "--top", "3", "--host-top", "4", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Prefill profile")
    rows = [ln for ln in text.splitlines() if ln.startswith("| eager |")]
    assert [r.split("|")[2].strip() for r in rows] == ["no", "yes"]  # without and with LoRA
    for r in rows:  # CPU operators counted per prefill step, and some busy time
        assert float(r.split("|")[4]) > 0 and float(r.split("|")[5].split()[0]) > 0
    assert "## eager, LoRA, prefill of batch 3" in text
    # --host-top: per case, the functions with the most host time per step (cProfile), the LoRA op among them
    assert text.count("of Python own time / step") == 2
    host_rows = [ln for ln in text.split("## eager, LoRA")[1].splitlines() if ln.startswith("| `")][-4:]
    assert len(host_rows) == 4 and all(float(r.split("|")[3]) > 0 for r in host_rows)
    assert any("moe_lora" in r or "lora_linear" in r for r in host_rows), host_rows
    sys.modules.pop("profile_decode", None)
