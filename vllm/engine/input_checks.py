"""What ``LLMEngine.add_request`` checks against the model before a request is queued.

``SamplingParams`` validates itself (types, ranges, finiteness); what depends on the
model is checked here: prompt token ids, ``stop_token_ids``, ``logit_bias`` and
``allowed_token_ids`` ids and the tokens of ``bad_words`` against the vocabulary,
the prompt length against ``max_model_len``, ``n`` against ``MAX_SAMPLES``.  Every
problem is a ValueError that names the request, the field, the value and the valid
range, so nothing a step cannot compute ever reaches one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from vllm.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict]


# Most samples (``n``) one request may ask for. Each is a Sequence built on the engine thread; more
# than max_num_seqs are fine (they run in waves), but n=10**12 would hang the thread building them.
MAX_SAMPLES = 4096


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    max_num_seqs: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


def prompt_ids(prompt: PromptType, tokenizer: Any) -> tuple[Optional[str], list[int]]:
    """(text or None, token ids) of a prompt: a string, a list of token ids, or a dict with
    'prompt_token_ids' (and optionally its 'prompt' text) or 'prompt'."""
    if isinstance(prompt, dict):
        unknown = sorted(map(str, set(prompt) - _PROMPT_KEYS))
        if unknown:
            raise ValueError(f"a prompt dict may hold only 'prompt', 'prompt_token_ids' and 'cache_salt' (text-only "
                             f"models), got "
                             f"{', '.join(map(repr, unknown))}; leave the other keys out")
        if "prompt_token_ids" in prompt:
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"a prompt dict's 'prompt' must be a string or None, got {type(text).__name__}")
            return text, _token_list(prompt["prompt_token_ids"])
        if not isinstance(prompt.get("prompt"), str):
            raise ValueError("a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of token ids), "
                             f"got keys {sorted(map(str, prompt))}")
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        return prompt, list(tokenizer.encode(prompt))
    if isinstance(prompt, (list, tuple)):
        return None, _token_list(prompt)
    raise ValueError(f"a prompt must be a string, a list of token ids or a dict with 'prompt' or "
                     f"'prompt_token_ids', got {type(prompt).__name__}")


def cache_salt(prompt: PromptType) -> Optional[str]:
    """The prompt dict's ``cache_salt`` (None when absent); a non-empty string, else a ValueError."""
    if not isinstance(prompt, dict) or prompt.get("cache_salt") is None:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def _token_list(ids: Any) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
    if set(map(type, ids)) <= {int}:  # the common case, checked at C speed (bool is not int: it is refused below)
        return list(ids)
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise ValueError(f"prompt_token_ids must be integers, got {t!r} at position {i}")
    return list(ids)


def truncate_prompt(token_ids: list[int], keep: Optional[int], max_model_len: int) -> list[int]:
    """The last ``keep`` tokens of the prompt (``truncate_prompt_tokens``; -1: the last ``max_model_len``;
    None: all), as vLLM truncates: from the left.  A ``keep`` above ``max_model_len`` is a ValueError."""
    if keep is None:
        return token_ids
    if keep == -1:
        keep = max_model_len
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens is {keep}, more than this model's maximum context length "
                         f"(max_model_len) of {max_model_len} tokens; ask for at most {max_model_len}, or -1 for "
                         "that many")
    return token_ids[-keep:]


def check_request(request_id: str, token_ids: list[int], params: SamplingParams, limits: RequestLimits) -> None:
    """Raise a ValueError for anything in the request that this model cannot run."""
    if not token_ids:
        raise ValueError(f"request {request_id!r}: the prompt is empty")
    if len(token_ids) >= limits.max_model_len:
        raise ValueError(f"request {request_id!r}: the prompt has {len(token_ids)} tokens, but max_model_len "
                         f"is {limits.max_model_len}; shorten the prompt or raise max_model_len")
    vocab = limits.vocab_size
    for field, ids in (("prompt_token_ids", token_ids), ("stop_token_ids", params.stop_token_ids),
                       ("logit_bias", list(params.logit_bias or ())),
                       ("allowed_token_ids", params.allowed_token_ids or []),
                       ("bad_words (tokenized)", [t for word in params.bad_words_token_ids for t in word])):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: {field} contains {bad}, outside the model's vocabulary "
                             f"of {vocab} tokens; every id must be in [0, {vocab})")
    if params.n > MAX_SAMPLES:
        raise ValueError(f"request {request_id!r}: n={params.n} samples are more than this engine takes in one "
                         f"request ({MAX_SAMPLES}); send several requests")
