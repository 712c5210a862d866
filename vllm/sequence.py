"""One generated sequence (one of a request's ``n`` samples) and its status.

A request with ``SamplingParams(n=k)`` becomes k ``Sequence`` objects sharing
``request_id`` and told apart by ``index`` (0..k-1). The scheduler, block
manager, model runner and detokenizer all read and update the same object:

- ``token_ids`` = prompt ids + output ids; ``num_tokens`` its length.
- ``num_computed_tokens``: leading tokens whose K/V are in the cache. After a
  step it is ``num_tokens - 1``: the last sampled token is fed in the next step.
  Preemption resets it to 0 (the whole prefix is recomputed).
- ``block_table``: KV-cache block ids, owned by ``BlockManager``; token
  position p lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
- With ``SamplingParams.logprobs`` set, ``output_logprobs`` holds one
  ``{token_id: Logprob}`` per output token and ``cumulative_logprob`` their sum;
  with ``prompt_logprobs`` set, ``prompt_logprobs`` holds one per prompt token
  (the first is None), filled by the prefill step.
- ``cache_key``: what the KV of its tokens depends on besides the tokens (the
  adapter's identity); ``block_hashes``: the prefix-cache hashes of its full
  blocks computed so far (``vllm.core.prefix_cache``; they never change, tokens
  are only appended).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from vllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from vllm.structured_output.backend import GrammarState


class SequenceStatus(enum.IntEnum):
    """WAITING: queued, never run. RUNNING: has KV blocks, decoding. PREEMPTED:
    blocks taken back, waits to be recomputed. FINISHED_*: done (blocks freed):
    STOPPED (EOS, stop token or stop string), LENGTH_CAPPED (max_tokens or
    max_model_len), ABORTED (by the user), IGNORED (prompt can never fit)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_IGNORED = 6

    @staticmethod
    def is_finished(status: "SequenceStatus") -> bool:
        return status >= SequenceStatus.FINISHED_STOPPED

    @staticmethod
    def get_finished_reason(status: "SequenceStatus") -> Optional[str]:
        """The OpenAI ``finish_reason``: 'stop', 'length', 'abort' or None."""
        return _FINISH_REASONS.get(status)


# vLLM reports an ignored (too long) prompt as 'length'.
_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_IGNORED: "length",
}


@dataclass
class Logprob:
    """One token's entry in a logprobs dict (``{token_id: Logprob}``).

    logprob: log-probability under the model's raw distribution (see
        ``SamplingParams.logprobs``).
    rank: 1 for the most likely token; for the chosen token, the number of
        vocabulary entries at least as likely as it (ties count against it).
    decoded_token: the token alone, decoded with special tokens kept (filled by
        the detokenizer; None before that).
    """

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# One position's logprobs: the chosen token and the top-k, by token id.
TokenLogprobs = dict[int, Logprob]


def seed_for_sample(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a seeded request: sample 0 uses
    ``seed`` itself; the others get distinct, reproducible seeds."""
    if index == 0:
        return seed
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


def adapter_cache_key(lora_request: Optional[Any], generation: int = 0) -> str:
    """The prefix-cache key of KV computed under ``lora_request`` ('' for the base model): its id,
    name and path, and ``generation``, which tells apart two loads of the same adapter."""
    if lora_request is None:
        return ""
    return "\x00".join(("lora", str(lora_request.lora_int_id), str(getattr(lora_request, "lora_name", "")),
                         str(getattr(lora_request, "lora_path", "")), str(generation)))


class Sequence:
    """A prompt and the tokens generated for it so far (see the module docstring).

    seq_id: unique across the engine. request_id: shared by the n samples.
    index: which of the n samples this is. prompt: the text, or None when the
    request gave token ids. lora_request: any object with an int
    ``lora_int_id`` (> 0), or None for the base model. eos_token_id: None when
    the tokenizer has none. arrival_time: seconds (time.time()); the scheduler
    serves and preempts by it (earliest first, latest preempted first).
    """

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int],
                 sampling_params: Optional[SamplingParams] = None, *, index: int = 0,
                 prompt: Optional[str] = None, lora_request: Optional[Any] = None,
                 eos_token_id: Optional[int] = None, arrival_time: Optional[float] = None,
                 cache_key: Optional[str] = None) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: the prompt is empty; give at least one token")
        if lora_request is not None and not isinstance(getattr(lora_request, "lora_int_id", None), int):
            raise TypeError(f"request {request_id!r}: lora_request must have an int lora_int_id, "
                            f"got {lora_request!r}")
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt = prompt
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self._token_ids: list[int] = list(prompt_token_ids)
        self.output_text = ""
        self.status = SequenceStatus.WAITING
        self.stop_reason: Union[int, str, None] = None
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.lora_request = lora_request
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None
        # Incremental detokenizer state (vllm.transformers_utils.detokenizer).
        self.prefix_offset: Optional[int] = None
        self.read_offset: Optional[int] = None
        self._generators: dict[torch.device, torch.Generator] = {}
        # Structured output: the grammar matcher, advanced by append_token_id (set by the engine).
        self.grammar: Optional["GrammarState"] = None
        # Prefix caching: the engine's key names the adapter's load (see LoRARegistry.cache_key).
        self.cache_key = cache_key if cache_key is not None else adapter_cache_key(lora_request)
        self.block_hashes: list[bytes] = []

    # ---- token bookkeeping -------------------------------------------------
    def __len__(self) -> int:
        return len(self._token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt + output ids (do not mutate; use ``append_token_id``)."""
        return self._token_ids

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not cached yet: what the next step must feed."""
        return len(self._token_ids) - self.num_computed_tokens

    def append_token_id(self, token_id: int, logprobs: Optional[TokenLogprobs] = None) -> None:
        """Append a generated token; ``logprobs`` (which must hold ``token_id``) is
        recorded in ``output_logprobs`` and added to ``cumulative_logprob``. With a grammar, the token
        advances it first (ValueError, nothing recorded, if the grammar does not allow it)."""
        if self.grammar is not None:
            self.grammar.sync(self.output_token_ids)
            self.grammar.accept(token_id)
        if logprobs is not None:
            if token_id not in logprobs:
                raise ValueError(f"the logprobs of token {token_id} do not contain it: {sorted(logprobs)}")
            self.output_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id].logprob
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    # ---- status ------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return SequenceStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> Optional[str]:
        return SequenceStatus.get_finished_reason(self.status)

    @property
    def lora_int_id(self) -> int:
        """The adapter id, 0 for the base model (vLLM's convention)."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    def suppressed_token_ids(self, tokens_ahead: int = 0) -> Optional[list[int]]:
        """Ids the sampler must not pick now: EOS (unless ignore_eos) and the stop
        token ids while fewer than ``min_tokens`` were generated; else None.

        ``tokens_ahead``: tokens sampled but not appended yet (async scheduling samples a
        step before the previous step's token is recorded); they count as generated."""
        params = self.sampling_params
        if self.num_output_tokens + tokens_ahead >= params.min_tokens:
            return None
        ids = list(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.append(self.eos_token_id)
        return ids or None

    # ---- seeded sampling ---------------------------------------------------
    def get_generator(self, device: Union[torch.device, str] = "cpu") -> Optional[torch.Generator]:
        """The sequence's own generator on ``device`` (None when unseeded).

        Created on first use from ``seed_for_sample(seed, index)`` and kept, so
        its state carries across steps and preemptions: each sampled token draws
        from it exactly once, whatever else is in the batch.
        """
        seed = self.sampling_params.seed
        if seed is None or self.sampling_params.temperature == 0:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed_for_sample(seed, self.index))
            self._generators[device] = gen
        return gen

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
                f"status={self.status.name}, num_prompt_tokens={self.num_prompt_tokens}, "
                f"num_output_tokens={self.num_output_tokens}, num_computed_tokens={self.num_computed_tokens}, "
                f"block_table={self.block_table}, lora_int_id={self.lora_int_id})")
