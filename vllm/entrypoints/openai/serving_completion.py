"""``/v1/completions``: plain and streamed, with echo and the legacy logprobs shape."""
from __future__ import annotations

import time
from typing import Any

from vllm.entrypoints.openai.logprobs import completion_logprobs
from vllm.entrypoints.openai.protocol import CompletionRequest, request_id
from vllm.entrypoints.openai.serving_engine import OpenAIServing
from vllm.outputs import CompletionOutput, RequestOutput


class CompletionServing(OpenAIServing):
    def _echo(self, out: RequestOutput) -> tuple[str, list[int], list]:
        """The prompt's text, ids and logprobs entries (None where there are none)."""
        text = out.prompt if out.prompt is not None else self.engine.tokenizer.decode(out.prompt_token_ids)
        ids = list(out.prompt_token_ids)
        return text, ids, list(out.prompt_logprobs or [None] * len(ids))

    async def completions(self, req: CompletionRequest):
        rid, created = request_id(req, "cmpl"), int(time.time())
        self._check_request(req, rid)
        req = self._with_defaults(req)
        lora = await self.models.resolve_on_demand(req.model)
        prompts: list[Any] = req.prompt if isinstance(req.prompt, list) and req.prompt else [req.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        self._params(req, None)  # values that do not depend on the prompt: refused before any work
        prepared = self._prepare(req, await self._tokenize(prompts), "prompt")
        model = req.model or self.models.base_names[0]
        gens, firsts = await self._start(prepared, lora, rid)
        want_lp = req.logprobs is not None
        if req.stream:
            def chunk(index, text, finish, usage=None, logprobs=None, **ids) -> dict:
                choices = [] if index is None else [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": finish, **ids}]
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
                                logprobs_of if want_lp else None, token_ids=bool(req.return_token_ids))
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
                if req.return_token_ids:
                    choices[-1].update(prompt_token_ids=list(o.prompt_token_ids), token_ids=list(c.token_ids))
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": self._usage(finals)}
