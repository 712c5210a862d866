"""Request fields the server knows but does not implement yet, and the ones it does not know.

A known field that changes the answer (tools, beam search...) is refused
with a 400 naming it, unless it is set to the value that changes nothing: clients often send
``tools: []``, and those are accepted (structured output - response_format, guided_*,
structured_outputs - is implemented: vllm/structured_output/request.py). Answering 200 without
applying a field would be a silent wrong answer. Unknown fields are accepted and reported (the server logs them once per request as
ignored), as vLLM does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from pydantic import BaseModel

# field -> (is the value a no-op for this request?, the no-op value as the error message names it)
_Rule = tuple[Callable[[Any, Any], bool], str]


def _one_of(*values: Any) -> Callable[[Any, Any], bool]:
    return lambda v, _req: v is None or any(v == x for x in values)


def _empty(v: Any, _req: Any) -> bool:
    return v is None or (isinstance(v, (list, dict, str)) and not v)


def _choice_without(tools_field: str) -> Callable[[Any, Any], bool]:
    """``tool_choice`` / ``function_call``: "none", or "auto" while no tools are given, choose nothing."""
    return lambda v, req: v is None or v == "none" or (v == "auto" and not _field(req, tools_field))


_BOTH: dict[str, _Rule] = {
    # vLLM's extra sampling and decoding fields
    "use_beam_search": (_one_of(False), "false"),
    "length_penalty": (_one_of(1), "1"),
    "spaces_between_special_tokens": (_one_of(True), "true"),
    "prompt_logprobs": (_one_of(), "null"),
    "logits_processors": (_empty, "null"),
    "return_tokens_as_token_ids": (_one_of(False), "false"),
    "guided_whitespace_pattern": (_one_of(), "null"),  # llguidance takes no whitespace regex
    "priority": (_one_of(0), "0"),
}
_COMPLETION: dict[str, _Rule] = {
    "suffix": (_empty, '""'),
    "add_special_tokens": (_one_of(True), "true"),
    "prompt_embeds": (_empty, "null"),  # text-only prompts: embeddings would be answered as if absent
}
_CHAT: dict[str, _Rule] = {
    "tools": (_empty, "[]"),
    "tool_choice": (_choice_without("tools"), '"none"'),
    "functions": (_empty, "[]"),
    "function_call": (_choice_without("functions"), '"none"'),
    "echo": (_one_of(False), "false"),
    "chat_template": (_one_of(), "null"),
    "add_special_tokens": (_one_of(False), "false"),
}
# Known fields that change nothing here, whatever their value (no log line).
# parallel_tool_calls only means something with tools, which are refused; guided_decoding_backend picks
# the grammar library, and llguidance serves every constraint whichever is named
KNOWN_NO_EFFECT = frozenset({"parallel_tool_calls", "guided_decoding_backend"})


def _is_chat(req: BaseModel) -> bool:
    return "messages" in type(req).model_fields


def _rules(req: BaseModel) -> dict[str, _Rule]:
    return {**_BOTH, **(_CHAT if _is_chat(req) else _COMPLETION)}


def _field(req: BaseModel, name: str) -> Any:
    if name in type(req).model_fields:
        return getattr(req, name)
    return (req.model_extra or {}).get(name)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr escapes lone surrogates, so the message can be encoded
    return text if len(text) <= limit else text[:limit] + "..."


def unsupported_field(req: BaseModel) -> Optional[tuple[str, str]]:
    """(message, field) for the first field set to a value the server cannot honour yet, else None."""
    for name, (no_op, default) in _rules(req).items():
        value = _field(req, name)
        if not no_op(value, req):
            return (f"{name} is not supported by this server yet (got {_short(value)}); leave it out or set it "
                    f"to {default}", name)
    return None


def ignored_fields(req: BaseModel) -> list[str]:
    """Fields of the request that nothing reads: unknown top-level ones, and nested ones named by
    their path (``stream_options.x``, ``messages[0].name``, ``messages[1].content[0].x``)."""
    known = set(_rules(req)) | KNOWN_NO_EFFECT
    names = [k for k in (req.model_extra or {}) if k not in known]
    options = getattr(req, "stream_options", None)
    if options is not None:
        names += [f"stream_options.{k}" for k in options.model_extra or {}]
    for i, message in enumerate(getattr(req, "messages", None) or []):
        names += [f"messages[{i}].{k}" for k in message.model_extra or {}]
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                names += [f"messages[{i}].content[{j}].{k}" for k in part if k not in ("type", "text")]
    return names
