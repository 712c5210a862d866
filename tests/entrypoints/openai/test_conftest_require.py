"""The server tests' dependencies: skipped without them on a developer's machine, a loud failure in CI."""
import importlib

import pytest

from .conftest import in_ci, require


@pytest.fixture
def httpx_missing(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == "httpx":
            raise ModuleNotFoundError("No module named 'httpx'", name="httpx")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake)


@pytest.mark.parametrize("value", ["true", "1", "yes", "True"])
def test_missing_dependency_fails_in_ci(httpx_missing, value):
    with pytest.raises(ImportError) as e:
        require("httpx", environ={"CI": value})
    assert not isinstance(e.value, pytest.skip.Exception)
    assert "'httpx'" in str(e.value) and 'pip install -e ".[test]"' in str(e.value)


@pytest.mark.parametrize("environ", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}])
def test_missing_dependency_skips_outside_ci(httpx_missing, environ):
    with pytest.raises(pytest.skip.Exception) as e:
        require("httpx", environ=environ)
    assert "httpx" in str(e.value) and 'pip install -e ".[test]"' in str(e.value)


def test_present_dependency_is_imported():
    import json

    assert require("json", environ={"CI": "true"}) is json
    assert in_ci({"CI": "true"}) and not in_ci({})
