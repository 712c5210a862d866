"""How one request is sampled: ``SamplingParams`` (the vLLM name and defaults).

Validation happens at construction (types, ranges, finiteness: a ValueError that names
the field, the value and the valid range), so a bad request fails where it is made
(``LLM.generate`` or the HTTP handler), never later inside a step.  What depends on
the model (token ids against the vocabulary, ``n`` against ``max_num_seqs``) is checked
by ``LLMEngine.add_request``.
"""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from vllm.logger import init_logger
# vLLM's import path: ``from vllm.sampling_params import StructuredOutputsParams``
from vllm.structured_output.params import GuidedDecodingParams, StructuredOutputsParams  # noqa: F401

logger = init_logger(__name__)

# Temperatures in (0, _MIN_TEMPERATURE) overflow fp32 logits / T; they are raised to this.
_MIN_TEMPERATURE = 1e-2

# Most alternatives per token that ``logprobs`` / ``prompt_logprobs`` may ask for
# (vLLM's default ``max_logprobs``; the OpenAI chat API's top_logprobs limit).
MAX_LOGPROBS = 20

# OpenAI's range for a logit bias; larger magnitudes are clamped to it (as vLLM's server does).
LOGIT_BIAS_LIMIT = 100.0

# ``seed`` is a 64-bit signed integer, as in vLLM's OpenAI protocol (torch generators take no more).
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
    top_k: keep the k most likely tokens; 0 or -1 disables it (-1 is stored as 0);
        a value >= the vocabulary size keeps every token.
    seed: when set (a 64-bit signed integer), the request's samples come from
        their own generators, so the tokens do not depend on what else is in the batch.
    max_tokens: most tokens to generate, >= 1; None = until ``max_model_len``.
    min_tokens: EOS and ``stop_token_ids`` are suppressed in the sampler and
        stop strings are not checked until this many tokens were generated.
    stop: string(s) that end generation; the text is cut before the string
        unless ``include_stop_str_in_output``. Stored as a list.
    stop_token_ids: token ids that end generation (stop_reason = the id); each must
        be in the model's vocabulary (checked by ``LLMEngine.add_request``).
    ignore_eos: keep generating past the EOS token.
    include_stop_str_in_output: keep the stop string (or stop token's text).
    skip_special_tokens: drop special tokens from the output text.
    logprobs: per generated token, return the log-probability of the sampled
        token and of the ``logprobs`` most likely tokens (0: the sampled token
        only; None: off). At most ``MAX_LOGPROBS``. The values are those of the
        model's raw distribution (log-softmax of the unmodified logits, before
        temperature, top-k / top-p and min_tokens suppression), as in vLLM; with structured
        output, of the grammar-masked logits (vLLM masks before its sampler).
    prompt_logprobs: the same for every prompt token after the first (the
        first has no context, so its entry is None); None: off.
    output_kind: ``RequestOutputKind`` - every step's output (default) or the final one only.
    presence_penalty: in [-2, 2]; subtracted from the logit of every token that
        the output already contains (> 0 favours new tokens). 0 disables it.
    frequency_penalty: in [-2, 2]; subtracted once per earlier occurrence in the
        output. 0 disables it.
    repetition_penalty: > 0; tokens of the prompt or the output have their logit
        divided by it when positive, multiplied when not (> 1 discourages
        repetition). 1 disables it.
    min_p: in [0, 1]; after temperature, tokens whose probability is below
        min_p times the most likely token's are removed. 0 disables it.
    logit_bias: {token id: bias} added to those logits before anything else;
        biases are clamped to [-100, 100]. Ids are checked against the vocabulary
        by ``LLMEngine.add_request``.
    allowed_token_ids: if set (a non-empty list), only these ids can be sampled.
    bad_words: words that must not be generated. Each word is tokenized with and
        without a leading space (``update_from_tokenizer``, done by the engine); a
        word's last token is banned whenever the output ends with the word's other
        tokens (single- and multi-token words; the match is against generated tokens).
    truncate_prompt_tokens: keep only the last k prompt tokens (left truncation, as vLLM);
        -1 keeps the last ``max_model_len`` (the engine applies it: a k above
        ``max_model_len`` is refused there). None: the prompt as given.
    best_of: vLLM's "sample best_of, return the best n". Only None or ``n`` (which is
        plain ``n`` sampling) is accepted; as in vLLM V1, which refuses best_of > 1,
        ranking extra samples is not supported.
    structured_outputs: a ``StructuredOutputsParams`` (or its fields as a dict): the output must match
        a JSON schema, regex, choice or grammar (vllm/structured_output/). ``guided_decoding`` is
        vLLM's older name for it; give one of them.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    truncate_prompt_tokens: Optional[int] = None
    best_of: Optional[int] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    guided_decoding: Optional[StructuredOutputsParams] = None

    def __post_init__(self) -> None:
        self._bad_words_token_ids: Optional[list[list[int]]] = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"SamplingParams: stop must be a string or a list of strings, got {self.stop!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"SamplingParams: stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = _logit_bias(self.logit_bias)
        self.allowed_token_ids = _id_list("allowed_token_ids", self.allowed_token_ids)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("SamplingParams: allowed_token_ids must be a non-empty list of token ids, or None to "
                             "allow every token")
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not isinstance(self.bad_words, (list, tuple)):
                raise ValueError(f"SamplingParams: bad_words must be a list of strings, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
            for w in self.bad_words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"SamplingParams: every bad word must be a non-empty string, got {w!r}")
        self._structured_outputs()
        self._verify()
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s and would overflow the logits; using %s",
                           self.temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE

    def _verify(self) -> None:
        """Every field's type and range; bool is not accepted where an int or float is meant."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"SamplingParams: {msg}")

        if not _is_int(self.n) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_finite_number(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be a number in (0, 1] (1 disables nucleus sampling), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 1 (a value >= the vocabulary size keeps every token), "
                      f"or 0 / -1 to disable it; got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise bad(f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}] (64-bit signed) or None, "
                      f"got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1 (or None for 'up to max_model_len'), "
                      f"got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad(f"every stop string must be a non-empty string, got {s!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.output_kind not in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            raise bad(f"output_kind must be RequestOutputKind.CUMULATIVE or FINAL_ONLY, got {self.output_kind!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (the number of most likely "
                          f"tokens returned besides the chosen one; None disables it), got {value!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise bad(f"stop_token_ids must be non-negative integers (token ids of the model's "
                          f"vocabulary), got {t!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not -2 <= value <= 2:
                raise bad(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
        if not _is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be a finite number > 0 (1 disables it), "
                      f"got {self.repetition_penalty!r}")
        if not _is_finite_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be a number in [0, 1] (0 disables it), got {self.min_p!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or not (k >= 1 or k == -1)):
            raise bad(f"truncate_prompt_tokens must be an integer >= 1 (keep the last k prompt tokens), -1 (keep "
                      f"the last max_model_len) or None, got {k!r}")
        if self.best_of is not None:
            if not _is_int(self.best_of) or self.best_of < 1:
                raise bad(f"best_of must be an integer >= 1 or None, got {self.best_of!r}")
            if self.best_of != self.n:
                raise bad(f"best_of is not supported when it differs from n (got best_of={self.best_of}, "
                          f"n={self.n}): ranking best_of samples to return the best n is not implemented (vLLM V1 "
                          "refuses best_of too); leave best_of out, or set it to n to get n samples")

    def _structured_outputs(self) -> None:
        """``structured_outputs`` / ``guided_decoding`` (either, the same object after this) as params."""
        so, gd = self.structured_outputs, self.guided_decoding
        if so is not None and gd is not None and so is not gd:
            raise ValueError("SamplingParams: give structured_outputs or guided_decoding (its older name), not both")
        value = so if so is not None else gd
        if isinstance(value, dict):
            value = StructuredOutputsParams(**value)
        if value is not None and not isinstance(value, StructuredOutputsParams):
            raise ValueError(f"SamplingParams: structured_outputs must be a StructuredOutputsParams, got "
                             f"{type(value).__name__}")
        self.structured_outputs = self.guided_decoding = value

    @property
    def needs_penalties(self) -> bool:
        """Whether any of presence, frequency or repetition penalty is active."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def bad_words_token_ids(self) -> list[list[int]]:
        """Token sequences of ``bad_words`` (set by ``update_from_tokenizer``; [] before)."""
        return self._bad_words_token_ids or []

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenize ``bad_words``: each word as given (leading spaces stripped) and with one leading
        space, the second kept only when it differs from the first in its first token but has as
        many tokens (vLLM's rule: a word inside a sentence usually starts with a space)."""
        if not self.bad_words or self._bad_words_token_ids is not None:
            return
        sequences: list[list[int]] = []
        for word in self.bad_words:
            bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if bare:
                sequences.append(bare)
            if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
                sequences.append(spaced)
        self._bad_words_token_ids = sequences

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


def _id_list(name: str, ids: Any) -> Optional[list[int]]:
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple, set)):
        raise ValueError(f"SamplingParams: {name} must be a list of token ids, got {ids!r}")
    for t in ids:
        if not _is_int(t) or t < 0:
            raise ValueError(f"SamplingParams: {name} must hold non-negative integers (token ids of the model's "
                             f"vocabulary), got {t!r}")
    return list(ids)


def _logit_bias(bias: Any) -> Optional[dict[int, float]]:
    """``{token id: bias}`` with the biases clamped to [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]; None if empty."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"SamplingParams: logit_bias must be a dict {{token id: bias}}, got {bias!r}")
    out: dict[int, float] = {}
    for token, value in bias.items():
        if not _is_int(token) or token < 0:
            raise ValueError(f"SamplingParams: logit_bias keys must be non-negative integer token ids, got {token!r}")
        if not _is_finite_number(value):
            raise ValueError(f"SamplingParams: logit_bias[{token}] must be a finite number (clamped to "
                             f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]), got {value!r}")
        out[token] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
    return out or None
