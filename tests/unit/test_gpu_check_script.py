"""scripts/gpu_check.sh and its steps (scripts/gpu_steps/*.sh): every step has its file and every file is a step,
all parse, ``help`` lists them, and a misspelt step stops before the setup instead of running nothing."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = os.path.join(ROOT, "scripts", "gpu_steps")


def _order() -> list[str]:
    text = open(SCRIPT).read()
    return re.search(r'^ORDER="([^"]*)"', text, re.M).group(1).split()


def test_every_step_has_a_file_and_every_file_is_a_step():
    files = sorted(f[:-3] for f in os.listdir(STEPS) if f.endswith(".sh"))
    assert sorted(_order()) == files


def test_scripts_parse():
    for path in [SCRIPT] + [os.path.join(STEPS, f) for f in os.listdir(STEPS)]:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)


def test_help_lists_every_step(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^(\w+): ", proc.stdout, re.M)
    assert listed == _order() + ["all"]
    assert not (tmp_path / "out").exists()


def test_unknown_step_stops_before_the_setup(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "decode", "sidestrem"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2
    assert "unknown step 'sidestrem'" in proc.stderr and "sidestream" in proc.stderr
    assert not (tmp_path / "out").exists()
