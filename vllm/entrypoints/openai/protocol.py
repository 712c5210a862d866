"""Request / response shapes of the OpenAI-compatible server (pydantic models).

What the HTTP layer can check without the model is checked here, each failure a 400 naming the
field: types, finite numbers (``Infinity`` / ``NaN``, which Python's json accepts, are refused),
64-bit integer ranges, and text that is valid Unicode (no lone surrogates such as ``"\\ud800"``).
Sampling fields are passed to ``SamplingParams``, whose range checks become 400s naming the field.
Fields the server knows but does not implement yet are refused unless set to their no-op value
(``unsupported_field``, table in ``unsupported.py``); unknown fields are accepted and listed by
``ignored_fields`` for the server to log, as vLLM does.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from vllm.entrypoints.openai.unsupported import ignored_fields, unsupported_field
from vllm.sampling_params import MAX_LOGPROBS, SamplingParams
from vllm.structured_output.params import StructuredOutputsParams
from vllm.structured_output.request import STRUCTURED_FIELDS, structured_outputs_of

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def request_id(req: "OpenAIModel", prefix: str) -> str:
    """The response's id: ``{prefix}-{request_id}`` when the client names it (vLLM's field; it must be
    unique among the requests in flight: a duplicate is refused), else a random one."""
    given = getattr(req, "request_id", None)
    return f"{prefix}-{given}" if given else random_id(prefix)


def check_unicode(value: str) -> str:
    """``value`` if it encodes as UTF-8; a ValueError saying where it does not (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(value[e.start]):04X} at index {e.start}), which is "
                         "not valid Unicode; send the text as valid UTF-8") from None
    return value


Text = Annotated[str, AfterValidator(check_unicode)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]


class OpenAIModel(BaseModel):
    # Unknown fields are kept (and logged as ignored); floats must be finite.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: Optional[bool] = False


class RequestError(ValueError):
    """A field value the endpoint refuses (-> 400 naming ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class _SamplingRequest(OpenAIModel):
    """Fields shared by completions and chat completions."""

    model: Optional[Text] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1, le=INT64_MAX)  # -1 / 0: off; >= vocab: all
    n: int = Field(default=1, ge=1, le=128)
    seed: Optional[int] = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Optional[Union[Text, list[Text]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Text] = None
    # ranges are checked by SamplingParams (a 400 naming the field)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_p: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, as OpenAI) -> bias
    allowed_token_ids: Optional[list[TokenId]] = None
    bad_words: Optional[list[Text]] = None
    truncate_prompt_tokens: Optional[int] = Field(default=None, ge=-1, le=INT64_MAX)  # last k tokens; -1: max_model_len
    cache_salt: Optional[str] = None  # prefix-cache blocks are shared only among requests with the same salt
    return_token_ids: Optional[bool] = None  # the prompt's and each choice's token ids in the response
    # the response's id (cmpl-/chatcmpl-{request_id}), unique among the requests in flight
    request_id: Optional[Text] = Field(default=None, min_length=1, max_length=256)
    best_of: Optional[int] = Field(default=None, ge=1, le=INT64_MAX)  # only n (SamplingParams says why)
    # structured output (vllm/structured_output/request.py); at most one of them
    response_format: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None

    def check_supported(self) -> None:
        """RequestError naming the first field the server cannot honour as sent."""
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options can only be set when stream is true", "stream_options")
        found = unsupported_field(self)
        if found is not None:
            raise RequestError(*found)

    def ignored_fields(self) -> list[str]:
        """Fields of the request (nested ones as ``messages[0].name``) that nothing reads."""
        return ignored_fields(self)

    def token_budget(self) -> tuple[Optional[int], str, bool]:
        """(the most tokens to generate or None, the field that says so, whether the client set it)."""
        return self.max_tokens, "max_tokens", "max_tokens" in self.model_fields_set

    def to_sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int] = None,
                           prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Raises ValueError (-> 400) for combinations SamplingParams refuses."""
        return SamplingParams(**self._penalty_fields(), n=self.n,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              top_k=0 if self.top_k is None else self.top_k, seed=self.seed, max_tokens=max_tokens,
                              min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
                              skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, structured_outputs=self._structured_outputs())

    def _structured_outputs(self) -> Optional[StructuredOutputsParams]:
        """response_format / guided_* / structured_outputs as one constraint (a 400 naming the field)."""
        return structured_outputs_of({k: getattr(self, k) for k in STRUCTURED_FIELDS}, RequestError)

    def _penalty_fields(self) -> dict[str, Any]:
        """The penalty and token-constraint fields as SamplingParams takes them (defaults when unset)."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise RequestError(f"logit_bias keys must be token ids (integers written as strings, e.g. "
                                   f"{{\"50256\": -100}}), got {sorted(self.logit_bias)!r:.80}", "logit_bias") from None
        return dict(frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    min_p=self.min_p or 0.0, logit_bias=bias, allowed_token_ids=self.allowed_token_ids,
                    bad_words=self.bad_words or None, truncate_prompt_tokens=self.truncate_prompt_tokens,
                    best_of=self.best_of)


# The legacy completions API returns at most 5 alternatives per token.
MAX_COMPLETION_LOGPROBS = 5
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids (ids: integers >= 0)"


class CompletionRequest(_SamplingRequest):
    prompt: Union[Text, list[Text], list[TokenId], list[list[TokenId]]]
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    suffix: Optional[Text] = None  # not implemented: refused unless empty

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Any:
        """One clear message instead of one error per member of the union."""
        try:
            return handler(value)
        except ValidationError as e:
            errors = e.errors()
            # the most telling error: a bad value (surrogate, negative id) before a wrong type
            specific = [x for x in errors if not x["type"].endswith(("_type", "_parsing"))] or errors
            detail = specific[0]["msg"].removeprefix("Value error, ") if specific else ""
            raise ValueError(f"must be {_PROMPT_SHAPES}; {detail}") from None

    def sampling_params(self, max_tokens: Optional[int]) -> SamplingParams:
        """``logprobs`` = k alternatives per token (0..5); with ``echo`` the prompt's too."""
        k = self.logprobs
        if k is not None and not 0 <= k <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (the number of most "
                               f"likely tokens returned per position), got {k}", "logprobs")
        return self.to_sampling_params(max_tokens, logprobs=k, prompt_logprobs=k if self.echo else None)


class ChatMessage(OpenAIModel):
    role: Text
    content: Optional[Union[Text, list[dict[str, Any]]]] = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        """Content parts must be ``{"type": "text", "text": <string>}`` (the models served take text only)."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part {i} has type {kind!r}; only 'text' parts are supported")
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"content part {i}: 'text' must be a string, got "
                                     f"{'null' if text is None else type(text).__name__}")
                try:
                    check_unicode(text)
                except ValueError as e:
                    raise ValueError(f"content part {i}: 'text' {e}") from None
        return content

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...], checked above
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class _ChatTemplateFields(OpenAIModel):
    """What the chat template is rendered with, besides the messages (vLLM's fields):
    ``chat_template_kwargs`` extra template variables (e.g. Qwen3's ``enable_thinking``),
    ``reasoning_effort`` (gpt-oss's template variable), ``documents`` (RAG templates),
    ``continue_final_message`` (continue the last assistant message instead of opening a new one)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[Literal["low", "medium", "high"]] = None
    documents: Optional[list[dict[str, Any]]] = None


class ChatCompletionRequest(_ChatTemplateFields, _SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    # not implemented: refused unless no-op (no tools)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None

    def token_budget(self) -> tuple[Optional[int], str, bool]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens", True
        return self.max_tokens, "max_tokens", "max_tokens" in self.model_fields_set

    def sampling_params(self, max_tokens: Optional[int]) -> SamplingParams:
        """``logprobs: true`` returns each token's logprob, ``top_logprobs`` (0..20) alternatives with it."""
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise RequestError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                                   "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.to_sampling_params(max_tokens, logprobs=logprobs)


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
    lora_name: Text = Field(min_length=1)
    lora_path: Text = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: Text = Field(min_length=1)
    lora_int_id: Optional[int] = None



class TokenizeCompletionRequest(OpenAIModel):
    """``POST /tokenize`` with a text prompt (vLLM's shape)."""

    model: Optional[Text] = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_ChatTemplateFields):
    """``POST /tokenize`` with chat messages: the chat template's rendering is tokenised."""

    model: Optional[Text] = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    """``POST /detokenize``: token ids back to text."""

    model: Optional[Text] = None
    tokens: list[TokenId]
