"""Prompt shapes accepted by ``LLM.generate`` and the engines, as in vLLM's ``vllm.inputs``.

    from vllm import TokensPrompt
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3]), TextPrompt(prompt="hello=")])

They are ``TypedDict``s: plain dicts at run time. Keys other than these are refused by the engine
(this engine serves text-only models: no ``multi_modal_data``)."""
from __future__ import annotations

from typing import NotRequired, TypedDict, Union


class TextPrompt(TypedDict):
    """A text prompt, tokenised by the engine.  ``cache_salt``: prefix-cache blocks are shared only
    with requests that give the same salt (as vLLM)."""

    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """Token ids, with (optionally) the text they came from."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


PromptType = Union[str, list[int], TextPrompt, TokensPrompt]
SingletonPrompt = PromptType

__all__ = ["PromptType", "SingletonPrompt", "TextPrompt", "TokensPrompt"]
