"""The offline API: ``LLM(model=DIR, enable_lora=True, ...).generate(prompts, params, lora_request=...)``."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence, Union

from vllm.engine.arg_utils import EngineArgs
from vllm.engine.errors import RequestFailedError
from vllm.engine.llm_engine import LLMEngine, PromptType
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.transformers_utils.chat_template import render_chat
from vllm.transformers_utils.tokenizer import encode_text, load_chat_template

Many = Union[None, Any, Sequence[Any]]


def _per_prompt(value: Many, n: int, name: str, kind: type) -> list:
    if value is None or isinstance(value, kind):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} for {n} prompts; give one, or one per prompt")
    for v in values:
        if v is not None and not isinstance(v, kind):
            raise TypeError(f"{name}: expected {kind.__name__} entries, got {type(v).__name__}")
    return values


def _final_only(params: list[Optional[SamplingParams]], default: Callable[[], SamplingParams]) -> list[SamplingParams]:
    """Copies (the caller's objects stay as they are) that ask the engine for final outputs only:
    ``generate`` returns nothing before a request finishes, so per-step outputs would be wasted.
    ``None`` entries get ``default``."""
    copies: dict[int, SamplingParams] = {}
    out, fallback = [], None
    for p in params:
        if p is None:
            fallback = p = fallback or default()
        if id(p) not in copies:
            copies[id(p)] = p.clone()
            copies[id(p)].output_kind = RequestOutputKind.FINAL_ONLY
        out.append(copies[id(p)])
    return out


class LLM:
    """Generate text for a batch of prompts, each on the base model or its own LoRA adapter.

    Keyword arguments are the engine's (``EngineArgs``): dtype, seed, max_model_len,
    max_num_seqs, enable_lora, max_loras, max_lora_rank, max_cpu_loras, ...
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        args = EngineArgs.from_kwargs(model, **kwargs)
        if "usage_context" not in kwargs:  # vLLM's defaults for offline use (a bigger step on a large GPU)
            args.usage_context = "llm_class"
        self.llm_engine = LLMEngine(args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses when given no sampling params: SamplingParams' defaults overridden by
        the model's generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens as max_tokens) unless the engine was built with ``generation_config="vllm"``."""
        return SamplingParams(**self.llm_engine.generation_defaults.sampling)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached KV block (vLLM's name): later prompts compute their prefixes again.
        Blocks of running sequences stay theirs. Returns True."""
        self.llm_engine.reset_prefix_cache()
        return True

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 lora_request: Union[None, LoRARequest, Sequence[Optional[LoRARequest]]] = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in prompt order.

        ``sampling_params`` and ``lora_request`` are one for all prompts or one per prompt
        (``None`` entries: ``get_default_sampling_params()``; the base model).  A bad request
        raises before anything runs.  When requests fail inside the engine (an error while their
        step was computed), the rest of the batch still runs; then ``RequestFailedError`` is raised naming each failed
        prompt and its cause, with every output (failed ones have ``error`` set) in its
        ``outputs``.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _final_only(_per_prompt(sampling_params, len(prompts), "sampling_params", SamplingParams),
                             self.get_default_sampling_params)
        loras = _per_prompt(lora_request, len(prompts), "lora_request", LoRARequest)
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p, lr in zip(prompts, params, loras):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, p, lora_request=lr)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # nothing of a rejected batch keeps running
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id not in done:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        outputs = [done[i] for i in ids]
        failed = {f"prompt {k} (request {o.request_id})": o.error for k, o in enumerate(outputs) if o.error}
        if failed:
            lines = "; ".join(f"{what}: {error}" for what, error in failed.items())
            raise RequestFailedError(f"{len(failed)} of {len(outputs)} requests failed inside the engine, the "
                                     f"others completed (all outputs are in this error's .outputs): {lines}",
                                     {o.request_id: o.error for o in outputs if o.error}, outputs)
        return outputs

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             lora_request: Union[None, LoRARequest, Sequence[Optional[LoRARequest]]] = None, *,
             chat_template: Optional[str] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: Optional[dict] = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the tokenizer's chat template,
        or ``chat_template`` (the Jinja text or a file path) instead; ``chat_template_kwargs`` are extra
        template variables, ``continue_final_message`` continues the last (assistant) message."""
        if chat_template is not None:
            chat_template = load_chat_template(chat_template)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        if chat_template is None and getattr(tok, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template=... or use generate()")
        prompts = []
        for conv in conversations:
            text = render_chat(tok, conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                               continue_final_message=continue_final_message,
                               chat_template_kwargs=chat_template_kwargs)
            prompts.append({"prompt": text, "prompt_token_ids": encode_text(tok, text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, lora_request, use_tqdm=use_tqdm)
