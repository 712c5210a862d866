"""The logic behind the OpenAI routes: model/adapter names, completions and chat (plain and streamed)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Optional

from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                                              random_id)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError",
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def not_found(message: str, param: Optional[str] = None) -> APIError:
    return APIError(message, 404, "NotFoundError", param)


class Models:
    """The base model's served names and the adapters, by name."""

    def __init__(self, base_names: list[str], root: str, max_model_len: int) -> None:
        self.base_names = base_names
        self.root = root
        self.max_model_len = max_model_len
        self.adapters: dict[str, LoRARequest] = {}
        self._next_id = 1

    def new_lora(self, name: str, path: str) -> LoRARequest:
        req = LoRARequest(name, self._next_id, path, base_model_name=self.base_names[0])
        self._next_id += 1
        return req

    def resolve(self, name: Optional[str]) -> Optional[LoRARequest]:
        """None for the base model, the adapter's request otherwise; unknown names are 404."""
        if name is None or name in self.base_names:
            return None
        if name in self.adapters:
            return self.adapters[name]
        raise not_found(f"The model `{name}` does not exist.", "model")

    def listing(self) -> ModelList:
        cards = [ModelCard(id=n, root=self.root, max_model_len=self.max_model_len) for n in self.base_names]
        cards += [ModelCard(id=n, root=r.lora_path, parent=self.base_names[0]) for n, r in self.adapters.items()]
        return ModelList(data=cards)


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as (which, output) pairs; closing this closes them all."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await q.put((i, out))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            await q.put(e)
        finally:
            await q.put(done)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()


class Serving:
    def __init__(self, engine: AsyncLLMEngine, models: Models) -> None:
        self.engine = engine
        self.models = models

    # ---- shared -------------------------------------------------------------------------
    async def _start(self, prompts: list[Any], params, lora: Optional[LoRARequest], rid: str):
        """Add every prompt's request and wait for each first output, so that add_request errors
        (too-long prompt, bad adapter) become HTTP errors before any response is sent."""
        gens, firsts = [], []
        try:
            for i, p in enumerate(prompts):
                gen = self.engine.generate(p, params, f"{rid}-{i}", lora)
                gens.append(gen)
                firsts.append(await gen.__anext__())
        except (ValueError, TypeError) as e:
            for g in gens:
                await g.aclose()
            raise APIError(str(e)) from e
        except BaseException:
            for g in gens:
                await g.aclose()
            raise
        return gens, firsts

    @staticmethod
    async def _finish(gens, firsts) -> list[RequestOutput]:
        finals = list(firsts)
        try:
            for i, gen in enumerate(gens):
                if finals[i].finished:
                    continue
                async for out in gen:
                    finals[i] = out
        finally:
            for g in gens:
                await g.aclose()
        return finals

    @staticmethod
    def _usage(finals: list[RequestOutput]) -> dict:
        p = sum(len(o.prompt_token_ids) for o in finals)
        c = sum(len(c.token_ids) for o in finals for c in o.outputs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _stream(self, gens, firsts, n: int, make_chunk, rid: str, include_usage: bool,
                      first_chunks: list[dict]) -> AsyncIterator[str]:
        sent: dict[int, int] = {}
        finals = list(firsts)
        try:
            for chunk in first_chunks:
                yield sse(chunk)

            async def replay() -> AsyncIterator[tuple[int, RequestOutput]]:
                for i, out in enumerate(firsts):
                    yield i, out
                live = [g for g, f in zip(gens, firsts) if not f.finished]
                idx = [i for i, f in enumerate(firsts) if not f.finished]
                if live:
                    async for j, out in _merge(live):
                        yield idx[j], out

            async for i, out in replay():
                finals[i] = out
                for c in out.outputs:
                    index = i * n + c.index
                    start = sent.get(index, 0)
                    if start < 0:
                        continue  # this choice already finished
                    delta = c.text[start:] if len(c.text) >= start else ""
                    if delta or c.finish_reason is not None:
                        yield sse(make_chunk(index, delta, c.finish_reason))
                    sent[index] = -1 if c.finish_reason is not None else len(c.text)
            if include_usage:
                yield sse(make_chunk(None, None, None, usage=self._usage(finals)))
            yield sse("[DONE]")
        finally:
            for g in gens:
                await g.aclose()

    # ---- /v1/completions ------------------------------------------------------------------
    async def completions(self, req: CompletionRequest):
        lora = self.models.resolve(req.model)
        if req.echo:
            raise APIError("echo is not supported", param="echo")
        prompts: list[Any] = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
        try:
            params = req.to_sampling_params(req.max_tokens)
        except ValueError as e:
            raise APIError(str(e)) from e
        rid, created, model = random_id("cmpl"), int(time.time()), req.model or self.models.base_names[0]
        gens, firsts = await self._start(prompts, params, lora, rid)
        if req.stream:
            def chunk(index, text, finish, usage=None) -> dict:
                choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                                     "finish_reason": finish}]
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": choices, "usage": usage}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(gens, firsts, req.n, chunk, rid, include, [])
        finals = await self._finish(gens, firsts)
        choices = [{"index": i * req.n + c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for i, o in enumerate(finals) for c in o.outputs]
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(finals)}

    # ---- /v1/chat/completions -------------------------------------------------------------
    def _chat_prompt(self, req: ChatCompletionRequest) -> dict:
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise APIError("the model's tokenizer has no chat template; use /v1/completions")
        conv = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # a template that rejects the conversation
            raise APIError(f"the chat template failed on these messages: {e}", param="messages") from e
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return {"prompt_token_ids": list(ids)}

    async def chat(self, req: ChatCompletionRequest):
        lora = self.models.resolve(req.model)
        prompt = self._chat_prompt(req)
        try:
            params = req.to_sampling_params(req.max_completion_tokens or req.max_tokens)
        except ValueError as e:
            raise APIError(str(e)) from e
        rid, created, model = random_id("chatcmpl"), int(time.time()), req.model or self.models.base_names[0]
        gens, firsts = await self._start([prompt], params, lora, rid)
        if req.stream:
            def chunk(index, text, finish, usage=None, role=None) -> dict:
                choices = []
                if index is not None:
                    delta = {"role": role} if role else ({"content": text} if text else {})
                    choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, "usage": usage}

            include = bool(req.stream_options and req.stream_options.include_usage)
            role_chunks = [chunk(i, None, None, role="assistant") for i in range(req.n)]
            return self._stream(gens, firsts, req.n, chunk, rid, include, role_chunks)
        finals = await self._finish(gens, firsts)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in finals[0].outputs]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(finals)}
