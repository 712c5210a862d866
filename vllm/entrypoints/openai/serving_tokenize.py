"""``/tokenize`` and ``/detokenize`` (vLLM's request and response shapes), run off the event loop."""
from __future__ import annotations

import asyncio
from typing import Union

from vllm.entrypoints.openai.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from vllm.entrypoints.openai.serving_engine import APIError, OpenAIServing
from vllm.logger import init_logger
from vllm.transformers_utils.tokenizer import encode_text

logger = init_logger(__name__)


def _log_ignored(route: str, req: Union[TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest]) -> None:
    """Fields these routes do not read are logged (never silently dropped), as for completions."""
    names = list(req.model_extra or {})
    for i, message in enumerate(getattr(req, "messages", None) or []):
        names += [f"messages[{i}].{k}" for k in message.model_extra or {}]
    if names:
        logger.warning("%s: these fields are not known to the server and were ignored: %s", route,
                       ", ".join(repr(n) for n in names[:20]))


class TokenizeServing(OpenAIServing):
    async def tokenize(self, req: Union[TokenizeCompletionRequest, TokenizeChatRequest]) -> dict:
        """``{"count", "max_model_len", "tokens"}`` (and ``token_strs`` when asked). The ``model`` field
        must name the base model or a served adapter (adapters share the base model's tokenizer)."""
        _log_ignored("/tokenize", req)
        await self.models.resolve_on_demand(req.model)  # unknown names are a 404, as for completions
        tok = self.engine.tokenizer

        def run() -> list[int]:
            if isinstance(req, TokenizeChatRequest):
                text = self._render_chat(req)["prompt"]  # type: ignore[attr-defined]  # ChatServing's
            else:
                text = req.prompt
            return encode_text(tok, text, req.add_special_tokens)

        ids = await asyncio.to_thread(run)
        out: dict = {"count": len(ids), "max_model_len": self._model_config.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = tok.convert_ids_to_tokens(ids)
        return out

    async def detokenize(self, req: DetokenizeRequest) -> dict:
        """``{"prompt": text}``; an id outside the vocabulary is a 400 naming ``tokens``."""
        _log_ignored("/detokenize", req)
        await self.models.resolve_on_demand(req.model)
        vocab = self._model_config.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
        if bad is not None:
            raise APIError(f"tokens[{bad}] is {req.tokens[bad]}, outside this model's vocabulary [0, {vocab}); "
                           "send ids the model's tokenizer produced", param="tokens")
        tok = self.engine.tokenizer
        text = await asyncio.to_thread(tok.decode, list(req.tokens))
        return {"prompt": text}
