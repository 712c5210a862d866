"""Structured output: requests constrained by a JSON schema, regex, choice or grammar (llguidance).

params.py: ``StructuredOutputsParams`` (alias ``GuidedDecodingParams``); backend.py: compile + cache,
per-sequence ``GrammarState``; bitmask.py: the step's batched token mask; request.py: the OpenAI
server's request fields -> params.
"""
from vllm.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["StructuredOutputsParams", "GuidedDecodingParams"]
