"""StructuredOutputsParams checks, the server's request fields -> params, the compile cache, and the
per-sequence state's sync (consume / roll back) that keeps it equal to the sequence's tokens."""
import json
import os

import pytest

from vllm.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from vllm.structured_output.backend import GrammarCompiler
from vllm.structured_output.request import structured_outputs_of
from vllm.transformers_utils.tokenizer import get_tokenizer

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_model")


class _Err(ValueError):
    def __init__(self, message, param):
        super().__init__(message)
        self.param = param


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "JSON schema"), ({"choice": []}, "non-empty list"), ({"choice": "ab"}, "non-empty list"),
    ({"choice": ["a", 1]}, "non-empty string"), ({"regex": ""}, "non-empty"), ({"grammar": "  "}, "non-empty"),
    ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern is not supported"),
    ({"json": {}, "disable_additional_properties": True}, "additionalProperties"),
])
def test_params_refuse_what_they_cannot_apply(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_forms():
    so = StructuredOutputsParams(regex="a+")
    assert SamplingParams(structured_outputs=so).guided_decoding is so
    assert SamplingParams(guided_decoding=GuidedDecodingParams(choice=["x"])).structured_outputs.choice == ["x"]
    assert SamplingParams(structured_outputs={"json": '{"type": "object"}'}).structured_outputs.json == {
        "type": "object"}
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs=so, guided_decoding=StructuredOutputsParams(regex="b"))
    with pytest.raises(ValueError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs="a+")


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fields,expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("json_object", True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     ("json", SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, ("json", SCHEMA)), ({"guided_regex": "a+"}, ("regex", "a+")),
    ({"guided_choice": ["a", "b"]}, ("choice", ["a", "b"])), ({"guided_grammar": "start: \"a\""},
                                                                ("grammar", "start: \"a\"")),
    ({"structured_outputs": {"regex": "b+"}}, ("regex", "b+")),
])
def test_request_fields(fields, expected):
    got = structured_outputs_of(fields, _Err)
    if expected is None:
        assert got is None
    else:
        assert (got.kind, getattr(got, got.kind)) == expected


@pytest.mark.parametrize("fields,param,match", [
    ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured-output constraint"),
    ({"structured_outputs": {"rgx": "a"}}, "structured_outputs", "rgx"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
])
def test_request_fields_refused_naming_the_field(fields, param, match):
    with pytest.raises(_Err, match=match) as e:
        structured_outputs_of(fields, _Err)
    assert e.value.param == param


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(get_tokenizer(DEMO), 57)


def test_compile_is_cached_per_constraint():
    from tests.entrypoints.tiny_models import char_tokenizer

    compiler = GrammarCompiler(char_tokenizer(), 128)  # printable ASCII: JSON can be written
    before = compiler.compiles
    a = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "string"}}}))
    b = compiler.compile(StructuredOutputsParams(json='{"properties": {"x": {"type": "string"}}, "type": "object"}'))
    assert a is b and compiler.compiles == before + 1  # the same schema, written differently: one compile
    compiler.compile(StructuredOutputsParams(regex="[a-c]+"))
    assert compiler.compiles == before + 2
    s1, s2 = compiler.new_state(StructuredOutputsParams(regex="[a-c]+")), \
        compiler.new_state(StructuredOutputsParams(regex="[a-c]+"))
    assert s1.matcher is not s2.matcher and compiler.compiles == before + 2


@pytest.mark.parametrize("params,match", [
    (StructuredOutputsParams(json={"type": "nope"}), "invalid json"),
    (StructuredOutputsParams(regex="[a-"), "invalid regex"),
    (StructuredOutputsParams(grammar="start: missing_rule"), "invalid grammar"),
    (StructuredOutputsParams(regex="[0-9]+"), "no token of this model's vocabulary"),
])
def test_invalid_constraints_say_what_is_wrong(compiler, params, match):
    with pytest.raises(ValueError, match=match):
        compiler.compile(params)


def test_state_sync_consumes_and_rolls_back(compiler):
    """A sequence rebuilt with fewer or more outputs (recompute, replay) gets a matcher that matches them."""
    state = compiler.new_state(StructuredOutputsParams(regex="ab=[A-C]+"))
    state.sync([5, 6, 4])  # "ab="
    assert state.num_consumed == 3
    state.sync([5])  # back to "a": "=" is not allowed next, "b" is
    fresh = compiler.new_state(StructuredOutputsParams(regex="ab=[A-C]+"))
    fresh.sync([5])
    assert state.matcher.compute_bitmask() == fresh.matcher.compute_bitmask()
    assert state.num_consumed == 1
    with pytest.raises(ValueError, match="not allowed by the request's grammar"):
        state.sync([5, 4])
