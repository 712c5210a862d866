"""docs/compatibility.md is kept true: every "supported" row exists in the code (an EngineArgs field,
a `vllm serve` flag, a request model field, an app route) and every "refused" row is refused
(TypeError for a keyword, argparse error for a flag, a 400-naming error for a request field's
value, 404 for a route)."""
import dataclasses
import json
import os
import re

import pytest

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.entrypoints.cli import make_parser

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "compatibility.md")
MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")
STATUSES = {"supported", "refused", "ignored", "n/a"}


def _tables() -> dict[str, list[dict[str, str]]]:
    """{section heading: rows as {column: cell}}; backticks around cells are removed."""
    sections: dict[str, list[dict[str, str]]] = {}
    heading, header = None, None
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## "):
                heading, header = line[3:].strip(), None
                sections[heading] = []
            elif line.startswith("|") and heading is not None:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if header is None:
                    header = cells
                elif not set("".join(cells)) <= set("-: "):
                    sections[heading].append({h: re.sub(r"^`(.*)`$", r"\1", c) for h, c in zip(header, cells)})
            else:
                header = None if not line.startswith("|") else header
    return sections


TABLES = _tables()


def _rows(section: str, status: str) -> list[dict[str, str]]:
    return [r for r in TABLES[section] if r["status"] == status]


def test_doc_has_the_four_tables_with_known_statuses():
    assert set(TABLES) >= {"LLM keyword arguments", "`vllm serve` flags", "Request fields", "Endpoints"}
    for name, rows in TABLES.items():
        assert rows, name
        for row in rows:
            assert row["status"] in STATUSES, (name, row)


# ---- LLM keyword arguments ---------------------------------------------------------------------
def test_supported_kwargs_are_engine_arguments():
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {f.name for f in dataclasses.fields(AsyncEngineArgs)} == fields
    for row in _rows("LLM keyword arguments", "supported"):
        assert row["kwarg"] in fields, row
        EngineArgs.from_kwargs(MODEL, **{row["kwarg"]: getattr(EngineArgs, row["kwarg"], None)})


@pytest.mark.parametrize("kwarg", [r["kwarg"] for r in _rows("LLM keyword arguments", "refused")])
def test_refused_kwargs_raise(kwarg):
    with pytest.raises(TypeError, match=f"unknown engine argument.*{kwarg}"):
        EngineArgs.from_kwargs(MODEL, **{kwarg: 1})


# ---- vllm serve flags ----------------------------------------------------------------------------
def _serve_options() -> set[str]:
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {s for a in sub.choices["serve"]._actions for s in a.option_strings}


@pytest.mark.parametrize("row", _rows("`vllm serve` flags", "supported"), ids=lambda r: r["flag"])
def test_supported_flags_exist(row):
    flag, *value = row["flag"].split()
    assert flag in _serve_options(), row
    if value:  # a flag documented with a value: that value is taken
        args = make_parser().parse_args(["serve", MODEL, flag, *value])
        assert getattr(args, flag.lstrip("-").replace("-", "_")) == value[0]


@pytest.mark.parametrize("row", _rows("`vllm serve` flags", "refused"), ids=lambda r: r["flag"])
def test_refused_flags_stop_the_parser(row, capsys):
    words = row["flag"].split()
    argv = ["serve", MODEL, *words] + ([] if len(words) > 1 or words[0].startswith("--no-")
                                        or "enable" in words[0] else ["x"])
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(argv)
    assert e.value.code == 2
    assert words[0] in capsys.readouterr().err


# ---- request fields ------------------------------------------------------------------------------
def _models():
    from tests.entrypoints.openai.conftest import require

    require("pydantic")
    from vllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    return {"completions": CompletionRequest, "chat": ChatCompletionRequest}


def _endpoints(row) -> list[str]:
    return ["completions", "chat"] if row["endpoint"] == "both" else [row["endpoint"]]


@pytest.mark.parametrize("row", _rows("Request fields", "supported"), ids=lambda r: f"{r['endpoint']}-{r['field']}")
def test_supported_fields_are_request_fields(row):
    from vllm.entrypoints.openai import unsupported

    models = _models()
    for endpoint in _endpoints(row):
        model = models[endpoint]
        assert row["field"] in model.model_fields or row["field"] in unsupported.KNOWN_NO_EFFECT, (endpoint, row)
        assert row["field"] not in unsupported._rules(model.model_construct()), (endpoint, row)  # not refused


def _base_body(endpoint: str) -> dict:
    if endpoint == "completions":
        return {"model": "m", "prompt": "hello="}
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("row", _rows("Request fields", "refused"), ids=lambda r: f"{r['endpoint']}-{r['field']}")
def test_refused_fields_are_refused_naming_the_field(row):
    from vllm.entrypoints.openai.protocol import RequestError

    models = _models()
    value = json.loads(row["refused value"])
    for endpoint in _endpoints(row):
        req = models[endpoint].model_validate({**_base_body(endpoint), row["field"]: value})
        with pytest.raises(ValueError) as e:
            req.check_supported()
            req.sampling_params(16)
        err = e.value
        param = err.param if isinstance(err, RequestError) else str(err).removeprefix("SamplingParams: ").split()[0]
        assert param == row["field"], (endpoint, row, err)
        assert "not supported" in str(err), (endpoint, err)


# ---- endpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    from tests.entrypoints.openai.conftest import require

    require("fastapi")
    from vllm.engine.async_llm_engine import AsyncLLMEngine
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.serving import Models

    engine = AsyncLLMEngine.from_engine_args(EngineArgs(MODEL, max_model_len=64))
    try:
        yield build_app(engine, Models(["demo"], "demo", 64))
    finally:
        engine.shutdown()


def _method_path(row) -> tuple[str, str]:
    method, path = row["endpoint"].split()
    return method, path


@pytest.mark.parametrize("row", _rows("Endpoints", "supported"), ids=lambda r: r["endpoint"])
def test_supported_endpoints_are_routes(app, row):
    method, path = _method_path(row)
    assert any(getattr(r, "path", None) == path and method in getattr(r, "methods", ()) for r in app.routes), row


@pytest.mark.parametrize("row", _rows("Endpoints", "refused"), ids=lambda r: r["endpoint"])
def test_refused_endpoints_are_404(app, row):
    from fastapi.testclient import TestClient

    method, path = _method_path(row)
    assert not any(getattr(r, "path", None) == path for r in app.routes), row
    r = TestClient(app).request(method, path, json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text
