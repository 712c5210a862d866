"""Rendering a conversation with the chat template, with vLLM's extra template inputs.

``render_chat(tokenizer, conversation, ...)`` is what ``LLM.chat``, ``/v1/chat/completions`` and
``/tokenize`` use: ``chat_template_kwargs`` become template variables (Qwen3's ``enable_thinking``,
gpt-oss's ``reasoning_effort``...), ``documents`` go to RAG templates, and ``continue_final_message``
leaves the last (assistant) message open for the model to continue.
"""
from __future__ import annotations

from typing import Any, Optional

# apply_chat_template's own parameters: a template variable must not replace them
_RESERVED = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                       "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatTemplateError(ValueError):
    """What is wrong with the template inputs; ``field`` names the request field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def template_kwargs(chat_template_kwargs: Optional[dict[str, Any]], reasoning_effort: Optional[str] = None,
                    *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> dict[str, Any]:
    """The extra keyword arguments of ``apply_chat_template``; ChatTemplateError for a bad combination."""
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: set "
                                "add_generation_prompt to false to continue the last message",
                                "continue_final_message")
    extra = dict(chat_template_kwargs or {})
    bad = sorted(k for k in extra if not isinstance(k, str) or k in _RESERVED)
    if bad:
        raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(map(repr, bad))}: those are "
                                "parameters of the rendering itself (use the request fields)", "chat_template_kwargs")
    if reasoning_effort is not None:
        extra.setdefault("reasoning_effort", reasoning_effort)
    return extra


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]], *, chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: Optional[dict[str, Any]] = None, reasoning_effort: Optional[str] = None,
                documents: Optional[list[dict[str, Any]]] = None) -> str:
    """The template's text for ``conversation`` (special tokens included, nothing tokenised)."""
    extra = template_kwargs(chat_template_kwargs, reasoning_effort, add_generation_prompt=add_generation_prompt,
                            continue_final_message=continue_final_message)
    if continue_final_message and (not conversation or conversation[-1].get("role") != "assistant"):
        raise ChatTemplateError("continue_final_message continues the last message, which must be the "
                                "assistant's", "continue_final_message")
    return tokenizer.apply_chat_template(conversation, chat_template=chat_template, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, tokenize=False, **extra)
