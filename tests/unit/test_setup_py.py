"""setup.py on a machine with CUDA torch and a CUDA toolkit, but without ``csrc/`` sources:
the install must be pure Python, not crash (it raised FileNotFoundError on an H200 once)."""
import importlib.util
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("vllm_setup_script", os.path.join(REPO, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() is not called
    return mod


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make this CPU machine look like one with CUDA torch and a toolkit."""
    import torch
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.delenv("VLLM_SKIP_CSRC", raising=False)


def test_no_csrc_folder_is_a_pure_python_install(setup_module, fake_cuda, tmp_path):
    assert setup_module.cuda_sources(str(tmp_path)) == []
    assert setup_module.cuda_extensions(str(tmp_path)) == ([], {})


def test_empty_csrc_folder_is_a_pure_python_install(setup_module, fake_cuda, tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "README.md").write_text("no sources yet")
    assert setup_module.cuda_extensions(str(tmp_path)) == ([], {})


def test_csrc_sources_become_the_extension(setup_module, fake_cuda, tmp_path):
    (tmp_path / "csrc").mkdir()
    for name in ("b_ops.cu", "a_bind.cpp", "notes.txt"):
        (tmp_path / "csrc" / name).write_text("")
    assert setup_module.cuda_sources(str(tmp_path)) == [os.path.join("csrc", "a_bind.cpp"),
                                                         os.path.join("csrc", "b_ops.cu")]
    exts, cmdclass = setup_module.cuda_extensions(str(tmp_path))
    assert [e.name for e in exts] == ["vllm._C"] and exts[0].sources == setup_module.cuda_sources(str(tmp_path))
    assert "build_ext" in cmdclass


def test_skip_switch(setup_module, fake_cuda, tmp_path, monkeypatch):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "ops.cu").write_text("")
    monkeypatch.setenv("VLLM_SKIP_CSRC", "1")
    assert setup_module.cuda_extensions(str(tmp_path)) == ([], {})
