"""What ``LLM.generate`` returns: one ``RequestOutput`` per prompt, holding one
``CompletionOutput`` per sample (``SamplingParams.n``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from vllm.sequence import Logprob, TokenLogprobs

if TYPE_CHECKING:
    from vllm.sequence import Sequence

__all__ = ["CompletionOutput", "Logprob", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One sample of a request.

    index: which of the n samples (0..n-1).
    text: generated text (stop string cut off unless include_stop_str_in_output).
    token_ids: generated token ids (a stop token or EOS that fired is included).
    cumulative_logprob, logprobs: None unless ``SamplingParams.logprobs`` was
        set; then ``logprobs`` has one ``{token_id: Logprob}`` per token of
        ``token_ids`` (the chosen token first, then the top ``logprobs`` tokens by
        rank) and ``cumulative_logprob`` is the sum of the chosen tokens' logprobs.
    finish_reason: None while running; 'stop' (EOS, stop token or stop string),
        'length' (max_tokens, max_model_len, or a prompt too long to run) or 'abort'
        (aborted, or the request failed: see ``RequestOutput.error``).
    stop_reason: the stop string or stop token id that fired; None otherwise
        (also for EOS).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[TokenLogprobs]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
                f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
                f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason})")


class RequestOutput:
    """The state of one request: its prompt and its samples so far.

    prompt: the prompt text, or None when token ids were given.
    outputs: one ``CompletionOutput`` per sample, ordered by index.
    finished: True once every sample has finished.
    lora_request: the adapter the request ran with, or None.
    prompt_logprobs: with ``SamplingParams.prompt_logprobs``, one entry per
        prompt token (None for the first, then ``{token_id: Logprob}``: the
        prompt token first, then the top tokens); None otherwise (and until the
        prompt was run).
    error: None, or why the request failed inside the engine (an exception while
        its step was computed, e.g. in the model runner, sampler or detokenizer).
        A failed request is finished; its unfinished samples end with finish_reason
        'abort' and keep what they generated before the failure.  The other
        requests of the step are not affected.
    """

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 outputs: list[CompletionOutput], finished: bool, lora_request: Optional[Any] = None,
                 prompt_logprobs: Optional[list[Optional[TokenLogprobs]]] = None,
                 error: Optional[str] = None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.lora_request = lora_request
        self.error = error

    @classmethod
    def from_seqs(cls, seqs: Iterable["Sequence"]) -> "RequestOutput":
        """Snapshot of a request from all of its sequences (any order)."""
        seqs = sorted(seqs, key=lambda s: s.index)
        if not seqs:
            raise ValueError("RequestOutput.from_seqs needs at least one sequence")
        first = seqs[0]
        if any(s.request_id != first.request_id for s in seqs):
            raise ValueError(f"sequences of different requests given to RequestOutput.from_seqs: "
                             f"{sorted({s.request_id for s in seqs})}")
        want_logprobs = first.sampling_params.logprobs is not None
        outputs = [CompletionOutput(index=s.index, text=s.output_text, token_ids=list(s.output_token_ids),
                                    cumulative_logprob=s.cumulative_logprob if want_logprobs else None,
                                    logprobs=list(s.output_logprobs) if want_logprobs else None,
                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                   for s in seqs]
        prompt_logprobs = next((s.prompt_logprobs for s in seqs if s.prompt_logprobs is not None), None)
        return cls(request_id=first.request_id, prompt=first.prompt, prompt_token_ids=list(first.prompt_token_ids),
                   outputs=outputs, finished=all(s.is_finished for s in seqs), lora_request=first.lora_request,
                   prompt_logprobs=prompt_logprobs)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
                f"outputs={self.outputs}, "
                f"finished={self.finished}, lora_request={self.lora_request}"
                + (f", error={self.error!r})" if self.error is not None else ")"))
