"""Generated requests for fuzzing the OpenAI server (hypothesis strategies) and the checks on each answer.

Every request field is drawn either valid or hostile: huge integers (past int64 and uint64), non-finite
numbers (written as the non-standard JSON tokens ``NaN`` / ``Infinity``), wrong types, lone surrogates
(``"\\ud800"`` escapes), token ids outside the vocabulary, nested junk, unknown fields, bodies that are
not JSON or too large, and adapter paths that try to leave the allowed folders. Whatever comes, the
server must answer below 500 and stay healthy; good requests mixed in must keep their exact answers.

Used by ``test_fuzz_server.py`` (a few hundred requests in the suite) and ``benchmarks/fuzz_server.py``
(thousands).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from hypothesis import strategies as st

VOCAB_SIZE = 57  # the demo model's vocabulary (a test checks it against its config)
MODELS = ["demo", "upper", "rot13"]
HUGE_INTS = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 10**30,
             -1, -2**31, -2**63, -2**63 - 1, -10**30]
ODD_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, -0.0, 1e-30]
ODD_TEXT = ["", "\ud800", "a\udfffb", "\x00", "\u202e", "🙂" * 10, "=" * 200, "\n" * 50, "<|endoftext|>",
            "../../etc/passwd", "%s%n", "null"]
ESCAPING_PATHS = ["/etc", "/etc/passwd", "/", "..", "../..", "../../../../etc", "~", "~root", "~/.ssh",
                  "/proc/self/cwd", "/proc/self/root/etc", "examples/demo_adapters/../../../etc",
                  "/tmp", "relative/does/not/exist", "\ud800", "a" * 5000, "/dev/zero", "file:///etc"]
# fields with value rules of their own (penalties and logit_bias are applied, the others refused unless no-op)
UNSUPPORTED_FIELDS = ["frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "min_p",
                      "allowed_token_ids", "bad_words", "best_of", "truncate_prompt_tokens", "suffix", "response_format",
                      "tools", "tool_choice", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                      "structured_outputs"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.sampled_from(HUGE_INTS),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_FLOATS),
                    st.text(max_size=12), st.sampled_from(ODD_TEXT))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=8)


huge_ints = st.sampled_from(HUGE_INTS)
odd_numbers = st.sampled_from(HUGE_INTS + ODD_FLOATS)


@dataclass
class Field:
    """A request field's values: ``valid`` ones (edge cases included) and ``hostile`` ones."""

    valid: st.SearchStrategy
    hostile: st.SearchStrategy = junk

    def __post_init__(self) -> None:
        if self.hostile is not junk:
            self.hostile = st.one_of(self.hostile, junk)


vocab_ids = st.integers(0, VOCAB_SIZE - 1)
bad_ids = st.one_of(st.integers(VOCAB_SIZE, VOCAB_SIZE + 4), huge_ints)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
valid_prompts = st.one_of(words.map(lambda w: f"{w}="), st.lists(words.map(lambda w: f"{w}="), min_size=1, max_size=3),
                          st.lists(vocab_ids, min_size=1, max_size=8),
                          st.lists(st.lists(vocab_ids, min_size=1, max_size=4), min_size=1, max_size=2))
hostile_prompts = st.one_of(st.sampled_from(ODD_TEXT), st.lists(bad_ids, min_size=1, max_size=4),
                            st.lists(st.lists(bad_ids, max_size=4), max_size=3), st.just([]), st.just([[]]),
                            st.text(min_size=1, max_size=30))
sampling = {
    "max_tokens": Field(st.integers(1, 8), huge_ints),
    "temperature": Field(st.sampled_from([0, 0.0, 1e-3, 0.5, 1.0, 2.0, 100.0]), odd_numbers),
    "top_p": Field(st.one_of(st.floats(1e-6, 1.0), st.just(1)), odd_numbers),
    "top_k": Field(st.sampled_from([-1, 0, 1, 5, VOCAB_SIZE, VOCAB_SIZE * 10, 2**31 - 1, 2**63 - 1]), huge_ints),
    "n": Field(st.integers(1, 3), huge_ints),
    "seed": Field(st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from([-2**63, 2**63 - 1, 0])), huge_ints),
    "stop": Field(st.one_of(words, st.lists(words, max_size=3))),
    "stop_token_ids": Field(st.lists(vocab_ids, max_size=3), st.lists(bad_ids, min_size=1, max_size=3)),
    "ignore_eos": Field(st.booleans()),
    "min_tokens": Field(st.integers(0, 1), huge_ints),  # <= the smallest valid max_tokens
    "stream": Field(st.booleans()),
    "stream_options": Field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "user": Field(st.text(max_size=8)),
}
completion_fields = {**sampling, "model": Field(st.sampled_from(MODELS), st.sampled_from(ODD_TEXT)),
                     "prompt": Field(valid_prompts, hostile_prompts), "echo": Field(st.booleans()),
                     "logprobs": Field(st.integers(0, 5), huge_ints)}
content_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), min_size=1, max_size=3)
bad_parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": junk}),
                     min_size=1, max_size=3)
valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                 "content": st.one_of(words, content_parts)}), min_size=1, max_size=3)
hostile_messages = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "x"]), junk),
                                                   "content": st.one_of(bad_parts, junk)}), max_size=3)
chat_fields = {**sampling, "model": Field(st.sampled_from(MODELS), st.sampled_from(ODD_TEXT)),
               "messages": Field(valid_messages, hostile_messages),
               "max_completion_tokens": Field(st.integers(1, 8), huge_ints), "logprobs": Field(st.booleans()),
               "top_logprobs": Field(st.integers(0, 20), huge_ints), "add_generation_prompt": Field(st.booleans())}
load_fields = {"lora_name": Field(words.filter(lambda n: n not in MODELS), st.sampled_from(ODD_TEXT)),
               "lora_path": Field(st.sampled_from(["upper", "rot13"]), st.sampled_from(ESCAPING_PATHS))}


@dataclass
class FuzzRequest:
    """One HTTP request: ``body`` is the raw bytes sent (not always JSON)."""

    path: str
    body: bytes
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})

    @property
    def is_streamed(self) -> bool:
        return b'"stream": true' in self.body


def _body(fields: dict[str, Field], required: tuple[str, ...]) -> st.SearchStrategy:
    """A request body. Its hostility is drawn first: 2 in 5 bodies are wholly valid (edge values
    included: they must be served), 2 in 5 have exactly one hostile field, 1 in 5 any number; junk
    bodies also get unsupported and unknown fields, or lose a required one."""
    names = sorted(fields)

    @st.composite
    def build(draw) -> dict:
        level = draw(st.integers(0, 4))  # 0-1 valid, 2-3 one hostile field, 4 anything goes
        chosen = [k for k in names if k in required or draw(st.integers(0, 4)) < 2]
        hostile = set()
        if level in (2, 3):
            hostile = {draw(st.sampled_from(chosen))}
        elif level == 4:
            hostile = {k for k in chosen if draw(st.booleans())}
        body: dict[str, Any] = {}
        for k in chosen:
            body[k] = draw(fields[k].hostile if k in hostile else fields[k].valid)
        if level < 4 and not hostile & {"stream", "stream_options", "logprobs", "top_logprobs"}:
            # cross-field rules of a valid request
            if "stream_options" in body:
                body["stream"] = True
            if "top_logprobs" in body and fields is chat_fields:
                body["logprobs"] = True
        if level == 4:
            if not draw(st.integers(0, 4)) and required:
                body.pop(draw(st.sampled_from(required)), None)
            if draw(st.booleans()):
                body[draw(st.sampled_from(UNSUPPORTED_FIELDS))] = draw(junk)
            if draw(st.booleans()):
                body[draw(st.text(max_size=10))] = draw(junk)  # an unknown field (or a duplicate name)
        elif not draw(st.integers(0, 9)):
            body[draw(st.text(alphabet="xyz_", min_size=3, max_size=8))] = draw(scalars)  # unknown: logged
        return body

    return build()


def _encode(obj: Any) -> bytes:
    # allow_nan writes NaN / Infinity; ensure_ascii writes lone surrogates as \\ud800 escapes
    return json.dumps(obj, allow_nan=True, ensure_ascii=True).encode()


raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"{", b"[]", b"null", b"1", b'"x"',
                                                                 b'{"prompt": "a=",', b"\xff\xfe", b"{}" * 100]))


@st.composite
def any_request(draw, huge_body_bytes: Optional[int] = None) -> FuzzRequest:
    """Any request the fuzzer sends. ``huge_body_bytes``: also, rarely, a body of that size."""
    kind = draw(st.integers(0, 99))
    if kind < 45:
        return FuzzRequest("/v1/completions", _encode(draw(_body(completion_fields, ("prompt",)))))
    if kind < 85:
        return FuzzRequest("/v1/chat/completions", _encode(draw(_body(chat_fields, ("messages",)))))
    if kind < 90:
        path = draw(st.sampled_from(["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]))
        return FuzzRequest(path, _encode(draw(_body(load_fields, ("lora_name", "lora_path")))))
    if kind < 98 or huge_body_bytes is None:
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"]))
        return FuzzRequest(path, draw(raw_bodies), {"content-type": draw(st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded"]))})
    big = b'{"model": "demo", "max_tokens": 1, "prompt": "' + b"a" * huge_body_bytes + b'"}'
    return FuzzRequest("/v1/completions", big)


def _known(path: str, body: str) -> FuzzRequest:
    return FuzzRequest(path, body.encode())


# The requests that once killed the engine or got a 5xx (issue findings), always sent first.
KNOWN_FINDINGS = [
    _known("/v1/completions", '{"model": "upper", "prompt": "hello=", "top_k": 9223372036854775808, "temperature": 1}'),
    _known("/v1/completions", '{"model": "demo", "prompt": "hello=", "seed": 18446744073709551616, "temperature": 1}'),
    _known("/v1/completions", '{"model": "demo", "prompt": "hello=", "seed": -9223372036854775809, "temperature": 1}'),
    _known("/v1/completions", '{"model": "upper", "prompt": "hello=", "stop_token_ids": [57], "min_tokens": 1, '
                              '"temperature": 0}'),
    _known("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}'),
    _known("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}'),
    _known("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}'),
    _known("/v1/completions", '{"model": "\\ud800", "prompt": "hello="}'),
    _known("/v1/completions", '{"model": "demo", "prompt": "hello=", "temperature": Infinity}'),
    _known("/v1/completions", '{"model": "demo", "prompt": "hello=", "top_p": NaN}'),
    _known("/v1/completions", '{"model": "demo", "prompt": [[99999]]}'),
]


def check_answer(req: FuzzRequest, status: int, text: str) -> Optional[str]:
    """What is wrong with the server's answer to ``req`` (None: nothing)."""
    if status >= 500:
        return f"{status} for {req.path} {req.body[:300]!r}: {text[:300]}"
    if status >= 400:
        try:
            err = json.loads(text)["error"]
            assert isinstance(err["message"], str) and err["code"] == status
        except Exception:  # noqa: BLE001 - any shape problem is the finding
            return f"{status} without an OpenAI-shaped error for {req.path} {req.body[:200]!r}: {text[:300]}"
    return None
