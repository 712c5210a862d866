"""The logic behind the OpenAI routes: model/adapter names, and ``Serving`` (completions and chat,
``serving_completion.py`` / ``serving_chat.py``, on the shared ``serving_engine.py``)."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional

from vllm.entrypoints.openai.lora_resolver import FilesystemLoRAResolver
from vllm.entrypoints.openai.protocol import ModelCard, ModelList
from vllm.entrypoints.openai.security import AdapterPathPolicy
from vllm.entrypoints.openai.serving_chat import ChatServing
from vllm.entrypoints.openai.serving_completion import CompletionServing
from vllm.entrypoints.openai.serving_engine import APIError, not_found, sse
from vllm.entrypoints.openai.serving_tokenize import TokenizeServing
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest

logger = init_logger(__name__)

__all__ = ["APIError", "Models", "Serving", "not_found", "sse"]


class Models:
    """The base model's served names and the adapters, by name."""

    def __init__(self, base_names: list[str], root: str, max_model_len: int) -> None:
        self.base_names = base_names
        self.root = root
        self.max_model_len = max_model_len
        self.adapters: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._resolver: Optional[FilesystemLoRAResolver] = None
        self._load: Optional[Callable[[LoRARequest], Awaitable[object]]] = None
        self._resolving: Optional[asyncio.Lock] = None

    def enable_resolver(self, resolver: FilesystemLoRAResolver,
                        load: Callable[[LoRARequest], Awaitable[object]]) -> None:
        """Load unknown adapter names on first use through ``resolver`` (``load``: the engine's add_lora)."""
        self._resolver, self._load = resolver, load

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

    async def resolve_on_demand(self, name: Optional[str]) -> Optional[LoRARequest]:
        """``resolve``, but an unknown name is first looked up by the resolver (if any) and loaded:
        404 when it has no such adapter, 400 when the adapter it found does not load."""
        try:
            return self.resolve(name)
        except APIError:
            if self._resolver is None or self._load is None or not isinstance(name, str):
                raise
        if self._resolving is None:
            self._resolving = asyncio.Lock()
        async with self._resolving:  # one load at a time: a name asked for twice at once loads once
            if name in self.adapters:
                return self.adapters[name]
            path = await asyncio.to_thread(self._resolver.find, name)
            if path is None:
                return self.resolve(name)  # the 404
            req = self.new_lora(name, path)
            try:
                await self._load(req)
            except Exception as e:  # bad files: this request fails, the server goes on
                msg = AdapterPathPolicy.public_message(str(e), path, name)
                raise APIError(f"the adapter {name!r} was found by the LoRA resolver but failed to load: {msg}",
                               param="model") from e
            self.adapters[name] = req
            logger.info("LoRA resolver: loaded adapter %s", name)
            return req

    def listing(self) -> ModelList:
        cards = [ModelCard(id=n, root=self.root, max_model_len=self.max_model_len) for n in self.base_names]
        cards += [ModelCard(id=n, root=r.lora_path, parent=r.base_model_name or self.base_names[0],
                            max_model_len=self.max_model_len)
                  for n, r in self.adapters.items()]
        return ModelList(data=cards)


class Serving(CompletionServing, ChatServing, TokenizeServing):
    """``completions``, ``chat``, ``tokenize`` and ``detokenize``, on one engine and one set of models."""
