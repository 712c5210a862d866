"""The logic behind the OpenAI routes: model/adapter names, and ``Serving`` (completions and chat,
``serving_completion.py`` / ``serving_chat.py``, on the shared ``serving_engine.py``)."""
from __future__ import annotations

from typing import Optional

from vllm.entrypoints.openai.protocol import ModelCard, ModelList
from vllm.entrypoints.openai.serving_chat import ChatServing
from vllm.entrypoints.openai.serving_completion import CompletionServing
from vllm.entrypoints.openai.serving_engine import APIError, not_found, sse
from vllm.entrypoints.openai.serving_tokenize import TokenizeServing
from vllm.lora.request import LoRARequest

__all__ = ["APIError", "Models", "Serving", "not_found", "sse"]


class Models:
    """The base model's served names and the adapters, by name."""

    def __init__(self, base_names: list[str], root: str, max_model_len: int) -> None:
        self.base_names = base_names
        self.root = root
        self.max_model_len = max_model_len
        self.adapters: dict[str, LoRARequest] = {}
        self._next_id = 1

    def new_lora(self, name: str, path: str, base_model_name: Optional[str] = None) -> LoRARequest:
        """A request for adapter ``name``; its card's parent is ``base_model_name`` (default: the first name)."""
        req = LoRARequest(name, self._next_id, path, base_model_name=base_model_name or self.base_names[0])
        self._next_id += 1
        return req

    def resolve(self, name: Optional[str]) -> Optional[LoRARequest]:
        """None for the base model, the adapter's request otherwise; unknown names are 404."""
        if name is None or name in self.base_names:
            return None
        if name in self.adapters:
            return self.adapters[name]
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate, escaped
        raise not_found(f"The model `{shown}` does not exist.", "model")

    def listing(self) -> ModelList:
        cards = [ModelCard(id=n, root=self.root, max_model_len=self.max_model_len) for n in self.base_names]
        cards += [ModelCard(id=n, root=r.lora_path, parent=r.base_model_name or self.base_names[0],
                            max_model_len=self.max_model_len)
                  for n, r in self.adapters.items()]
        return ModelList(data=cards)


class Serving(CompletionServing, ChatServing, TokenizeServing):
    """``completions``, ``chat``, ``tokenize`` and ``detokenize``, on one engine and one set of models."""
