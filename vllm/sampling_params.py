"""How one request is sampled: ``SamplingParams`` (the vLLM name and defaults).

Validation happens at construction, so a bad request fails where it is made
(``LLM.generate`` or the HTTP handler), never later inside a step.
"""
from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Optional, Union

from vllm.logger import init_logger

logger = init_logger(__name__)

# Temperatures in (0, _MIN_TEMPERATURE) overflow fp32 logits / T; they are raised to this.
_MIN_TEMPERATURE = 1e-2

# Most alternatives per token that ``logprobs`` / ``prompt_logprobs`` may ask for
# (vLLM's default ``max_logprobs``; the OpenAI chat API's top_logprobs limit).
MAX_LOGPROBS = 20


class RequestOutputKind(enum.IntEnum):
    """Which ``RequestOutput``s the engine's ``step()`` returns for a request.

    CUMULATIVE: one after every step that ran it, with everything so far (streaming).
    FINAL_ONLY: only the finished one (``LLM.generate`` asks for this: no per-step work).
    DELTA (only the new tokens) is not supported.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingType(enum.IntEnum):
    """GREEDY: argmax (temperature == 0). RANDOM: the default generator.
    RANDOM_SEED: the sequence's own generator, seeded from ``seed``."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request (all fields keyword-friendly).

    n: samples (sequences) generated per prompt, >= 1.
    temperature: 0 means greedy (argmax); > 0 divides the logits. Values in
        (0, 0.01) are raised to 0.01 with a warning (smaller ones overflow fp32).
    top_p: nucleus sampling, in (0, 1]; 1 disables it. The most likely token is
        always kept.
    top_k: keep the k most likely tokens; 0 or -1 disables it (-1 is stored as 0).
    seed: when set, the request's samples come from their own generators, so
        the tokens do not depend on what else is in the batch.
    max_tokens: most tokens to generate, >= 1; None = until ``max_model_len``.
    min_tokens: EOS and ``stop_token_ids`` are suppressed in the sampler and
        stop strings are not checked until this many tokens were generated.
    stop: string(s) that end generation; the text is cut before the string
        unless ``include_stop_str_in_output``. Stored as a list.
    stop_token_ids: token ids that end generation (stop_reason = the id).
    ignore_eos: keep generating past the EOS token.
    include_stop_str_in_output: keep the stop string (or stop token's text).
    skip_special_tokens: drop special tokens from the output text.
    logprobs: per generated token, return the log-probability of the sampled
        token and of the ``logprobs`` most likely tokens (0: the sampled token
        only; None: off). At most ``MAX_LOGPROBS``. The values are those of the
        model's raw distribution (log-softmax of the unmodified logits, before
        temperature, top-k / top-p and min_tokens suppression), as in vLLM.
    prompt_logprobs: the same for every prompt token after the first (the
        first has no context, so its entry is None); None: off.
    output_kind: ``RequestOutputKind`` - every step's output (default) or the final one only.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s and would overflow the logits; using %s",
                           self.temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE

    def _verify(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"SamplingParams: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be a positive integer, or 0 / -1 to disable it; got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1 (or None for 'up to max_model_len'), "
                      f"got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad(f"every stop string must be a non-empty string, got {s!r}")
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise bad(f"output_kind must be RequestOutputKind.CUMULATIVE or FINAL_ONLY, got {self.output_kind!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (the number of most likely "
                          f"tokens returned besides the chosen one; None disables it), got {value!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise bad(f"stop_token_ids must be non-negative integers, got {t!r}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature == 0:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """``stop_token_ids`` as a set (the EOS id is added per sequence, not here)."""
        return set(self.stop_token_ids)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
