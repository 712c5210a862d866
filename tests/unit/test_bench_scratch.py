"""The benchmarks' scratch folder (``benchmark_engine_lora.scratch_dir``: random checkpoints of real width, tens of
GB) is removed when the script ends, also when ``timeout`` stops it with SIGTERM (``exit_on_sigterm``): left
behind, a few runs filled a GPU machine's disk."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
SCRIPT = """
import sys, time
sys.path.insert(0, {bench!r})
from benchmark_engine_lora import exit_on_sigterm, scratch_dir
exit_on_sigterm()
work = scratch_dir("scratch_test_")
open(work + "/weights.bin", "wb").write(b"x" * 1024)
print(work, flush=True)
if {wait}:
    time.sleep(120)
else:
    sys.stdin.readline()  # exit once the test has seen the folder (a loaded machine may run the child first)
"""


@pytest.mark.parametrize("ending", ["normal exit", "SIGTERM"])
def test_scratch_dir_removed_at_exit(ending, tmp_path):
    wait = ending == "SIGTERM"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(bench=os.path.abspath(BENCH), wait=wait)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    work = proc.stdout.readline().strip()
    assert work.startswith(str(tmp_path)) and os.path.isfile(os.path.join(work, "weights.bin"))
    if wait:
        proc.send_signal(signal.SIGTERM)
    else:
        proc.stdin.write("\n")
    proc.stdin.close()
    rc = proc.wait(timeout=60)
    assert rc == (128 + signal.SIGTERM if wait else 0)
    assert not os.path.exists(work), f"{ending}: the scratch folder {work} was left behind"
