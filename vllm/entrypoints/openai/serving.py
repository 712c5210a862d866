"""The logic behind the OpenAI routes: model/adapter names, completions and chat (plain and streamed)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Optional

from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from vllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList,
                                              RequestError, random_id)
from vllm.lora.request import LoRARequest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.transformers_utils.detokenizer import Detokenizer


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


def _params(req):
    """The request's SamplingParams; refused values become 400s naming the field."""
    try:
        return req.sampling_params()
    except RequestError as e:
        raise APIError(str(e), param=e.param) from e
    except ValueError as e:
        raise APIError(str(e)) from e


class Serving:
    def __init__(self, engine: AsyncLLMEngine, models: Models) -> None:
        self.engine = engine
        self.models = models
        # token texts for logprobs positions the engine left undecoded (the first prompt token)
        self._token_text = Detokenizer(engine.tokenizer).token_text

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
                      first_chunks: list[dict], logprobs_of=None) -> AsyncIterator[str]:
        """SSE chunks: ``first_chunks``, then per choice its new text (and, with
        ``logprobs_of(index, choice, lo, hi)``, the logprobs object of its tokens
        [lo, hi) not sent yet), the finish reason, the usage, [DONE]."""
        sent: dict[int, int] = {}  # text characters sent per choice; -1 once it finished
        sent_tokens: dict[int, int] = {}
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
                    lo, hi = sent_tokens.get(index, 0), len(c.token_ids)
                    lp = logprobs_of(index, c, lo, hi) if logprobs_of is not None and hi > lo else None
                    if delta or c.finish_reason is not None or lp is not None:
                        yield sse(make_chunk(index, delta, c.finish_reason, logprobs=lp))
                    sent[index] = -1 if c.finish_reason is not None else len(c.text)
                    sent_tokens[index] = hi
            if include_usage:
                yield sse(make_chunk(None, None, None, usage=self._usage(finals)))
            yield sse("[DONE]")
        finally:
            for g in gens:
                await g.aclose()

    # ---- /v1/completions ------------------------------------------------------------------
    def _echo(self, out: RequestOutput) -> tuple[str, list[int], list]:
        """The prompt's text, ids and logprobs entries (None where there are none)."""
        text = out.prompt if out.prompt is not None else self.engine.tokenizer.decode(out.prompt_token_ids)
        ids = list(out.prompt_token_ids)
        return text, ids, list(out.prompt_logprobs or [None] * len(ids))

    async def completions(self, req: CompletionRequest):
        lora = self.models.resolve(req.model)
        prompts: list[Any] = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
        params = _params(req)
        rid, created, model = random_id("cmpl"), int(time.time()), req.model or self.models.base_names[0]
        gens, firsts = await self._start(prompts, params, lora, rid)
        want_lp = req.logprobs is not None
        if req.stream:
            def chunk(index, text, finish, usage=None, logprobs=None) -> dict:
                choices = [] if index is None else [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": finish}]
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": choices, "usage": usage}

            offsets: dict[int, int] = {}  # text offset of each choice's next token
            echo_chunks = []
            for i, first in enumerate(firsts if req.echo else []):
                text, ids, entries = self._echo(first)
                for j in range(req.n):
                    lp = None
                    if want_lp:
                        lp, offsets[i * req.n + j] = completion_logprobs(ids, entries, self._token_text)
                    echo_chunks.append(chunk(i * req.n + j, text, None, logprobs=lp))

            def logprobs_of(index: int, c: CompletionOutput, lo: int, hi: int) -> dict:
                lp, offsets[index] = completion_logprobs(c.token_ids[lo:hi], c.logprobs[lo:hi], self._token_text,
                                                         offsets.get(index, 0))
                return lp

            include = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(gens, firsts, req.n, chunk, rid, include, echo_chunks,
                                logprobs_of if want_lp else None)
        finals = await self._finish(gens, firsts)
        choices = []
        for i, o in enumerate(finals):
            text, ids, entries = self._echo(o) if req.echo else ("", [], [])
            for c in o.outputs:
                lp = None
                if want_lp:
                    lp, _ = completion_logprobs(ids + list(c.token_ids), entries + list(c.logprobs),
                                                self._token_text)
                choices.append({"index": i * req.n + c.index, "text": text + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
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
        params = _params(req)
        rid, created, model = random_id("chatcmpl"), int(time.time()), req.model or self.models.base_names[0]
        gens, firsts = await self._start([prompt], params, lora, rid)
        top = req.top_logprobs or 0

        def logprobs_of(index: Optional[int], c: CompletionOutput, lo: int, hi: int) -> Optional[dict]:
            if not req.logprobs:
                return None
            return chat_logprobs(c.token_ids[lo:hi], c.logprobs[lo:hi], top, self._token_text)

        if req.stream:
            def chunk(index, text, finish, usage=None, role=None, logprobs=None) -> dict:
                choices = []
                if index is not None:
                    delta = {"role": role} if role else ({"content": text} if text else {})
                    choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, "usage": usage}

            include = bool(req.stream_options and req.stream_options.include_usage)
            role_chunks = [chunk(i, None, None, role="assistant") for i in range(req.n)]
            return self._stream(gens, firsts, req.n, chunk, rid, include, role_chunks,
                                logprobs_of if req.logprobs else None)
        finals = await self._finish(gens, firsts)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_of(None, c, 0, len(c.token_ids)),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in finals[0].outputs]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(finals)}
