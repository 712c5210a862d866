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
                                "eager", "--top", "3", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Prefill profile")
    rows = [ln for ln in text.splitlines() if ln.startswith("| eager |")]
    assert [r.split("|")[2].strip() for r in rows] == ["no", "yes"]  # without and with LoRA
    for r in rows:  # CPU operators counted per prefill step, and some busy time
        assert float(r.split("|")[4]) > 0 and float(r.split("|")[5].split()[0]) > 0
    assert "## eager, LoRA, prefill of batch 3" in text
    sys.modules.pop("profile_decode", None)
