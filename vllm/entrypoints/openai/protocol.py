"""Request / response shapes of the OpenAI-compatible server (pydantic models)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from vllm.sampling_params import MAX_LOGPROBS, SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: Optional[bool] = False


class _SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = None
    n: int = Field(default=1, ge=1, le=128)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def to_sampling_params(self, default_max_tokens: Optional[int], logprobs: Optional[int] = None,
                           prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Raises ValueError (-> 400) for combinations SamplingParams refuses."""
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return SamplingParams(n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=0 if self.top_k is None else self.top_k, seed=self.seed, max_tokens=max_tokens,
                              min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class RequestError(ValueError):
    """A field value the endpoint refuses (-> 400 naming ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# The legacy completions API returns at most 5 alternatives per token.
MAX_COMPLETION_LOGPROBS = 5


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions

    def sampling_params(self) -> SamplingParams:
        """``logprobs`` = k alternatives per token (0..5); with ``echo`` the prompt's too."""
        k = self.logprobs
        if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (the number of most "
                               f"likely tokens returned per position), got {k}", "logprobs")
        return self.to_sampling_params(self.max_tokens, logprobs=k, prompt_logprobs=k if self.echo else None)


class ChatMessage(OpenAIModel):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    add_generation_prompt: bool = True
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None

    def sampling_params(self) -> SamplingParams:
        """``logprobs: true`` returns each token's logprob, ``top_logprobs`` (0..20) alternatives with it."""
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise RequestError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                                   "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.to_sampling_params(self.max_completion_tokens or self.max_tokens, logprobs=logprobs)


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None
