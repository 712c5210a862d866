"""The OpenAI server's structured-output fields -> one ``StructuredOutputsParams`` (or None).

Accepted, as vLLM accepts them (completions and chat completions alike):

- ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- vLLM's legacy ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``;
- vLLM's ``structured_outputs`` object: ``{"json": ..., "regex": ..., "choice": [...], "grammar": ...,
  "json_object": true}``.

At most one constraint per request; anything unreadable is a ``RequestError`` (a 400) naming the field.
"""
from __future__ import annotations

from typing import Any, Optional

from vllm.structured_output.params import StructuredOutputsParams

_LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _response_format(value: Any, error: Any) -> Optional[dict[str, Any]]:
    """The constraint of a ``response_format`` (None for text), or ``error(message)``."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise error('response_format must be an object with a "type": "text", "json_object" or "json_schema"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise error('response_format of type "json_schema" needs "json_schema": {"name": ..., '
                        '"schema": {...}} with the JSON schema as an object')
        return {"json": spec["schema"]}
    raise error(f'response_format type {kind!r} is not supported; use "text", "json_object" or "json_schema"')


def structured_outputs_of(fields: dict[str, Any], error: Any) -> Optional[StructuredOutputsParams]:
    """``fields``: the request's values of response_format, guided_* and structured_outputs (None when
    unset); ``error(message, param)`` builds the exception to raise."""
    found: list[tuple[str, dict[str, Any]]] = []
    if fields.get("response_format") is not None:
        spec = _response_format(fields["response_format"], lambda m: error(m, "response_format"))
        if spec is not None:
            found.append(("response_format", spec))
    for name, key in _LEGACY.items():
        if fields.get(name) is not None:
            found.append((name, {key: fields[name]}))
    so = fields.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise error(f"structured_outputs must be an object such as {{\"json\": {{...}}}}, got "
                        f"{type(so).__name__}", "structured_outputs")
        found.append(("structured_outputs", dict(so)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise error(f"give one structured-output constraint per request, got {names}", found[1][0])
    name, spec = found[0]
    try:
        return StructuredOutputsParams(**spec)
    except TypeError as e:  # an unknown key of the structured_outputs object
        raise error(f"{name}: {e}".replace("StructuredOutputsParams.__init__()", "structured_outputs"), name) from None
    except ValueError as e:
        raise error(f"{name}: {e}", name) from None


# The request fields read by ``structured_outputs_of``.
STRUCTURED_FIELDS = ("response_format", *_LEGACY, "structured_outputs")
