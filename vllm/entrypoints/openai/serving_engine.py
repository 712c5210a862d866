"""What completions and chat share: OpenAI-shaped errors, prompt preparation (tokenised off the
event loop and off the engine thread, then checked against the context length), adding the engine
requests, collecting or streaming their outputs."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, AsyncIterator, Optional, Union

from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.engine.errors import EngineDeadError, RequestFailedError
from vllm.engine.input_checks import truncate_prompt
from vllm.entrypoints.openai.protocol import RequestError
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import MAX_LOGPROBS, SamplingParams
from vllm.transformers_utils.detokenizer import Detokenizer
from vllm.transformers_utils.tokenizer import encode_text

logger = init_logger(__name__)

# At most this many ignored field names in the per-request warning.
_MAX_IGNORED_LISTED = 20


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped (``\\ud800``), so that it can be encoded as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError",
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param

    def body(self) -> dict:
        """The response body; every string escaped so that it encodes as UTF-8 whatever the client sent."""
        param = None if self.param is None else _printable(str(self.param))
        return {"error": {"message": _printable(self.message), "type": _printable(self.type), "param": param,
                          "code": self.status}}


def not_found(message: str, param: Optional[str] = None) -> APIError:
    return APIError(message, 404, "NotFoundError", param)


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


_PARAMS_FIELD = re.compile(r"^SamplingParams: (\w+)")


def value_error(e: ValueError, fields: Any = ()) -> APIError:
    """A 400 for a refused value; it names the field when the message starts with one of ``fields``."""
    if isinstance(e, RequestError):
        return APIError(str(e), param=e.param)
    m = _PARAMS_FIELD.match(str(e))
    return APIError(str(e), param=m.group(1) if m and m.group(1) in fields else None)


class OpenAIServing:
    """Shared by the completions and chat handlers (``Serving`` combines them)."""

    max_logprobs: int = MAX_LOGPROBS  # the server's cap (``--max-logprobs``) on logprobs and prompt_logprobs

    def __init__(self, engine: AsyncLLMEngine, models: Any) -> None:
        self.engine = engine
        self.models = models
        # token texts for logprobs positions the engine left undecoded (the first prompt token)
        self._token_text = Detokenizer(engine.tokenizer).token_text

    # ---- checks before anything runs ---------------------------------------------------------
    @staticmethod
    def _check_request(req: Any, rid: str) -> None:
        """Log the fields nothing reads (once per request, as vLLM does); refuse unsupported ones."""
        ignored = req.ignored_fields()
        if ignored:
            listed = ", ".join(repr(n) for n in ignored[:_MAX_IGNORED_LISTED])  # repr escapes surrogates
            more = f" and {len(ignored) - _MAX_IGNORED_LISTED} more" if len(ignored) > _MAX_IGNORED_LISTED else ""
            logger.warning("request %s: these fields are not known to the server and were ignored: %s%s",
                           rid, listed, more)
        try:
            req.check_supported()
        except RequestError as e:
            raise APIError(str(e), param=e.param) from e

    def _with_defaults(self, req: Any) -> Any:
        """``req`` with the model's generation_config.json defaults (``--generation-config auto``) in the
        sampling fields it left unset or null; they still count as unset (a default max_tokens that does
        not fit the context is fitted, not refused)."""
        defaults = self.engine.engine.generation_defaults.sampling
        update = {k: v for k, v in defaults.items() if k not in req.model_fields_set or getattr(req, k) is None}
        if not update:
            return req
        out = req.model_copy(update=update)
        object.__setattr__(out, "__pydantic_fields_set__", set(req.model_fields_set))
        return out

    def _params(self, req: Any, max_tokens: Optional[int]) -> SamplingParams:
        """The request's SamplingParams; refused values become 400s naming the field."""
        try:
            params = req.sampling_params(max_tokens)
        except ValueError as e:
            raise value_error(e, type(req).model_fields) from e
        asked = max(params.logprobs or 0, params.prompt_logprobs or 0)
        if asked > self.max_logprobs:
            field = "top_logprobs" if "messages" in type(req).model_fields else "logprobs"
            raise APIError(f"{field} is {asked}, above this server's limit of {self.max_logprobs} (--max-logprobs); "
                           f"ask for at most {self.max_logprobs}", param=field)
        return params

    # ---- prompts -----------------------------------------------------------------------------
    @property
    def _model_config(self) -> Any:
        return self.engine.engine.model_config

    async def _tokenize(self, prompts: list[Union[str, list[int]]], add_special_tokens: bool = True) -> list[dict]:
        """Engine prompts ``{"prompt": text, "prompt_token_ids": ids}``, strings tokenised in a worker
        thread: neither the event loop nor the engine thread waits for a long prompt."""
        tok = self.engine.tokenizer

        def encode() -> list[dict]:
            return [{"prompt": p, "prompt_token_ids": encode_text(tok, p, add_special_tokens)} if isinstance(p, str)
                    else {"prompt_token_ids": list(p)} for p in prompts]

        if not any(isinstance(p, str) for p in prompts):
            return encode()
        return await asyncio.to_thread(encode)

    def _check_prompt(self, ids: list[int], param: str, what: str) -> int:
        """The room left for generated tokens; a 400 naming ``param`` for an empty, too long or
        out-of-vocabulary prompt (``what``: "the prompt", "prompt 2", "the messages")."""
        cfg = self._model_config
        if not ids:
            raise APIError(f"{what} is empty; send at least one token", param=param)
        vocab = cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"{what} holds token id {bad}, outside this model's vocabulary [0, {vocab})", param=param)
        room = cfg.max_model_len - len(ids)
        if room < 1:
            raise APIError(f"This model's maximum context length (max_model_len) is {cfg.max_model_len} tokens and "
                           f"{what} has {len(ids)} tokens, which leaves no room for a generated token; shorten it",
                           param=param)
        return room

    def _max_tokens(self, req: Any, n_prompt: int, room: int) -> int:
        """The tokens to generate for a prompt of ``n_prompt`` tokens: the request's value when it fits
        (else a 400 giving both numbers, as vLLM), or all the room left when it did not ask."""
        value, field, explicit = req.token_budget()
        if value is None:
            return room
        if value <= room:
            return value
        if not explicit:  # a default (completions' 16) that does not fit: what fits
            return room
        limit = self._model_config.max_model_len
        raise APIError(f"{field} is too large: {value}. This model's maximum context length is {limit} tokens "
                       f"and your request has {n_prompt} input tokens ({value} > {limit} - {n_prompt}); lower "
                       f"{field} or shorten the prompt", param=field)

    def _check_stop_token_ids(self, req: Any) -> None:
        vocab = self._model_config.vocab_size
        bad = next((t for t in req.stop_token_ids or () if t >= vocab), None)
        if bad is not None:
            raise APIError(f"stop_token_ids holds {bad}, outside this model's vocabulary [0, {vocab})",
                           param="stop_token_ids")

    def _check_token_fields(self, params: SamplingParams) -> None:
        """logit_bias and allowed_token_ids ids against the vocabulary (a 400 naming the field)."""
        vocab = self._model_config.vocab_size
        for field, ids in (("logit_bias", params.logit_bias or ()),
                           ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise APIError(f"{field} holds token id {bad}, outside this model's vocabulary [0, {vocab})",
                               param=field)

    def _prepare(self, req: Any, prompts: list[dict], param: str,
                 what: str = "the prompt") -> list[tuple[dict, SamplingParams]]:
        """Each engine prompt with its SamplingParams (max_tokens fitted to that prompt)."""
        self._check_stop_token_ids(req)
        out, by_budget = [], {}
        for i, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"]
            if req.truncate_prompt_tokens is not None:
                try:
                    ids = truncate_prompt(ids, req.truncate_prompt_tokens, self._model_config.max_model_len)
                except ValueError as e:
                    raise APIError(str(e), param="truncate_prompt_tokens") from e
                if len(ids) < len(prompt["prompt_token_ids"]):  # echo shows the tokens kept, not the text
                    prompt = {"prompt_token_ids": ids}
            if req.cache_salt is not None:  # prefix-cache blocks shared only with the same salt
                if not req.cache_salt:
                    raise APIError("cache_salt must be a non-empty string", param="cache_salt")
                prompt = {**prompt, "cache_salt": req.cache_salt}
            room = self._check_prompt(ids, param, f"prompt {i}" if len(prompts) > 1 else what)
            budget = self._max_tokens(req, len(ids), room)
            if budget not in by_budget:
                by_budget[budget] = self._params(req, budget)
                self._check_token_fields(by_budget[budget])
            out.append((prompt, by_budget[budget]))
        return out

    # ---- engine requests ---------------------------------------------------------------------
    @staticmethod
    def engine_failure(e: BaseException) -> APIError:
        """The HTTP error for a request the engine could not serve: 400 when its grammar reached a dead end
        (the client's constraint), else 500 when it failed while computed (the others went on), 503 when
        the engine stopped. Only the error's type is shown: the details
        (which may hold server paths) are in the server log."""
        if isinstance(e, RequestFailedError):
            if e.failures and all("GrammarDeadEnd" in msg for msg in e.failures.values()):
                return APIError("the request's structured-output constraint cannot be continued with this "
                                 "model's vocabulary: at some point of the output its grammar allows no token "
                                 "the tokenizer can write; use a constraint the model can express", 400,
                                 "BadRequestError")
            kinds = sorted({msg.split(":", 1)[0] for msg in e.failures.values()}) or [type(e).__name__]
            return APIError(f"the request failed while the engine computed it ({', '.join(kinds)}); the server "
                            "logged the details and keeps serving other requests", 500, "InternalServerError")
        return APIError("the engine is not running", 503, "ServiceUnavailable")

    async def _start(self, prepared: list[tuple[dict, SamplingParams]], lora: Optional[LoRARequest], rid: str):
        """Add every prompt's request and wait for each first output, so that add_request errors
        (bad adapter, values the engine refuses) become HTTP errors before any response is sent."""
        gens, firsts = [], []
        try:
            for i, (p, params) in enumerate(prepared):
                gen = self.engine.generate(p, params, f"{rid}-{i}", lora)
                gens.append(gen)
                firsts.append(await gen.__anext__())
        except ValueError as e:  # what add_request refuses: the client's input
            for g in gens:
                await g.aclose()
            if lora is not None and self.models.adapters.get(lora.lora_name) is not lora:
                # the adapter was unloaded between resolving the name and adding the request
                raise not_found(f"The model `{lora.lora_name}` does not exist.", "model") from e
            raise APIError(str(e)) from e
        except (RequestFailedError, EngineDeadError) as e:
            for g in gens:
                await g.aclose()
            raise self.engine_failure(e) from e
        except BaseException:
            for g in gens:
                await g.aclose()
            raise
        return gens, firsts

    @classmethod
    async def _finish(cls, gens, firsts) -> list[RequestOutput]:
        finals = list(firsts)
        try:
            for i, gen in enumerate(gens):
                if finals[i].finished:
                    continue
                async for out in gen:
                    finals[i] = out
        except (RequestFailedError, EngineDeadError) as e:
            raise cls.engine_failure(e) from e
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
                      first_chunks: list[dict], logprobs_of=None, token_ids: bool = False) -> AsyncIterator[str]:
        """SSE chunks: ``first_chunks``, then per choice its new text (and, with
        ``logprobs_of(index, choice, lo, hi)``, the logprobs object of its tokens
        [lo, hi) not sent yet), the finish reason, the usage, [DONE].

        ``token_ids`` (vLLM's ``return_token_ids``): every choice chunk also carries the ids of
        the tokens it adds (``make_chunk(..., token_ids=[...])``; their concatenation is the
        choice's ``token_ids``), and a choice's first chunk its prompt's ids
        (``prompt_token_ids=[...]``)."""
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
                    async for j, out in merge(live):
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
                    ids = {}
                    if token_ids:
                        ids["token_ids"] = list(c.token_ids[lo:hi])
                        if index not in sent:
                            ids["prompt_token_ids"] = list(out.prompt_token_ids)
                    if delta or c.finish_reason is not None or lp is not None or ids.get("token_ids") \
                            or "prompt_token_ids" in ids:
                        yield sse(make_chunk(index, delta, c.finish_reason, logprobs=lp, **ids))
                    sent[index] = -1 if c.finish_reason is not None else len(c.text)
                    sent_tokens[index] = hi
            if include_usage:
                yield sse(make_chunk(None, None, None, usage=self._usage(finals)))
            yield sse("[DONE]")
        except (RequestFailedError, EngineDeadError) as e:  # the response has started: an error event ends it
            yield sse(self.engine_failure(e).body())
            yield sse("[DONE]")
        finally:
            for g in gens:
                await g.aclose()
