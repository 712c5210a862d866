"""``/v1/chat/completions``: the chat template rendered and tokenised off the event loop and the
engine thread; plain and streamed answers, with logprobs."""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from vllm.entrypoints.openai.logprobs import chat_logprobs
from vllm.entrypoints.openai.protocol import ChatCompletionRequest, request_id
from vllm.entrypoints.openai.serving_engine import APIError, OpenAIServing
from vllm.outputs import CompletionOutput
from vllm.transformers_utils.chat_template import ChatTemplateError, render_chat
from vllm.transformers_utils.tokenizer import encode_text


class ChatServing(OpenAIServing):
    def _render_chat(self, req: ChatCompletionRequest) -> dict:
        """The engine prompt of the conversation: the template's text and its token ids (the text
        already holds the special tokens the template writes, so none are added)."""
        tok = self.engine.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise APIError("the model's tokenizer has no chat template; use /v1/completions")
        conv = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_chat(tok, conv, add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               chat_template_kwargs=req.chat_template_kwargs, reasoning_effort=req.reasoning_effort,
                               documents=req.documents)
        except ChatTemplateError as e:
            raise APIError(str(e), param=e.field) from e
        except Exception as e:  # a template that rejects the conversation
            raise APIError(f"the chat template failed on these messages: {e}", param="messages") from e
        return {"prompt": text, "prompt_token_ids": encode_text(tok, text, add_special_tokens=False)}

    async def chat(self, req: ChatCompletionRequest):
        rid, created = request_id(req, "chatcmpl"), int(time.time())
        self._check_request(req, rid)
        req = self._with_defaults(req)
        lora = await self.models.resolve_on_demand(req.model)
        self._params(req, None)  # values that do not depend on the prompt: refused before any work
        prompt = await asyncio.to_thread(self._render_chat, req)
        prepared = self._prepare(req, [prompt], "messages", "the conversation")
        model = req.model or self.models.base_names[0]
        gens, firsts = await self._start(prepared, lora, rid)
        top = req.top_logprobs or 0

        def logprobs_of(index: Optional[int], c: CompletionOutput, lo: int, hi: int) -> Optional[dict]:
            if not req.logprobs:
                return None
            return chat_logprobs(c.token_ids[lo:hi], c.logprobs[lo:hi], top, self._token_text)

        if req.stream:
            def chunk(index, text, finish, usage=None, role=None, logprobs=None, token_ids=None,
                      prompt_token_ids=None) -> dict:
                choices = []
                if index is not None:
                    delta = {"role": role} if role else ({"content": text} if text else {})
                    choices = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
                    if token_ids is not None:
                        choices[0]["token_ids"] = token_ids
                out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": choices, "usage": usage}
                if prompt_token_ids is not None:  # return_token_ids: the first chunk of each choice
                    out["prompt_token_ids"] = prompt_token_ids
                return out

            include = bool(req.stream_options and req.stream_options.include_usage)
            role_chunks = [chunk(i, None, None, role="assistant") for i in range(req.n)]
            return self._stream(gens, firsts, req.n, chunk, rid, include, role_chunks,
                                logprobs_of if req.logprobs else None, token_ids=bool(req.return_token_ids))
        finals = await self._finish(gens, firsts)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs_of(None, c, 0, len(c.token_ids)),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in finals[0].outputs]
        out = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
               "usage": self._usage(finals)}
        if req.return_token_ids:
            out["prompt_token_ids"] = list(finals[0].prompt_token_ids)
            for choice, c in zip(choices, finals[0].outputs):
                choice["token_ids"] = list(c.token_ids)
        return out
