"""``StructuredOutputsParams``: what a request's output must match (vLLM's name and fields).

Exactly one constraint is given:

- ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON value valid under it;
- ``json_object``: True - any JSON object (the OpenAI ``response_format: {"type": "json_object"}``);
- ``regex``: the output fully matches this regular expression (Rust ``regex`` syntax, as llguidance);
- ``choice``: the output is exactly one of these strings;
- ``grammar``: a Lark grammar (llguidance's dialect) or a GBNF / EBNF grammar (llama.cpp's), converted by
  llguidance.

``disable_any_whitespace`` makes JSON compact (no whitespace between tokens); by default JSON may hold
whitespace, as in vLLM. vLLM's other options (``disable_fallback`` and ``disable_additional_properties``
accepted at their no-op value; ``whitespace_pattern``, ``structural_tag``) are refused when they would
change the output, never dropped. ``GuidedDecodingParams`` is the older name of the same class.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union


@dataclass
class StructuredOutputsParams:
    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    structural_tag: Optional[str] = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"structured outputs: {msg}")

        if self.json_object is False:
            self.json_object = None
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(given) != 1:
            raise bad(f"give exactly one of json, regex, choice, grammar or json_object, got "
                      f"{', '.join(given) if given else 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except json.JSONDecodeError as e:
                    raise bad(f"json must be a JSON schema (an object, or its JSON text); the text is not valid "
                              f"JSON: {e}") from None
            if not isinstance(self.json, (dict, bool)):
                raise bad(f"json must be a JSON schema (an object), got {type(self.json).__name__}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise bad(f"regex must be a non-empty string, got {self.regex!r:.80}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise bad(f"grammar must be a non-empty Lark or GBNF grammar string, got {self.grammar!r:.80}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise bad(f"choice must be a non-empty list of strings, got {self.choice!r:.80}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise bad(f"every choice must be a non-empty string, got {self.choice!r:.80}")
            self.choice = list(self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise bad(f"json_object must be true, got {self.json_object!r}")
        for name in ("disable_any_whitespace", "disable_fallback", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.disable_additional_properties:
            raise bad("disable_additional_properties is not supported; set \"additionalProperties\": false in "
                      "the schema instead")
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise bad(f"{name} is not supported by this engine; leave it out")

    @property
    def kind(self) -> str:
        """Which constraint: 'json', 'json_object', 'regex', 'choice' or 'grammar'."""
        for k in ("json", "regex", "choice", "grammar", "json_object"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("unreachable: __post_init__ checks one is set")

    def cache_key(self) -> tuple[str, str, bool]:
        """A hashable key of the compiled grammar: (kind, canonical text, compact JSON)."""
        kind = self.kind
        value = getattr(self, kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
        return kind, text, self.disable_any_whitespace


# vLLM's older name (``SamplingParams(guided_decoding=GuidedDecodingParams(...))``).
GuidedDecodingParams = StructuredOutputsParams
