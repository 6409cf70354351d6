"""Pydantic models of the OpenAI-style HTTP API: strict request models and response models.

Requests reject unknown fields and do no lax coercion ("0.5" is not a number, 1 is not true).
Checks that need the tokenizer or the model (token ids < vocab size, prompt length) belong to the
API layer. Serialize responses with `model_dump()`/`model_dump_json()`, not `exclude_unset`.
"""

import math
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticUndefined

# Same limits as server/sampling.py (not imported: this module stays free of torch).
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MIN_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry (vLLM does the same)


class FieldError(ValueError):
    """A cross-field validation failure that knows which request field it is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _StrictModel(BaseModel):
    # strict: no lax coercion; allow_inf_nan: Python's json accepts NaN/Infinity literals.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema marks most fields nullable ("temperature": null); null takes the default.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].default in (None, PydanticUndefined)
        }


def _check_token_ids(name: str, ids: Any) -> None:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{name} must hold token ids (integers >= 0)")


TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(_StrictModel):
    """`stream_options`: usage in the last chunk (include_usage) or in every chunk (continuous)."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(_StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None = the served model (OpenAI requires it; we are lenient)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    # vLLM extensions that benchmark and eval clients send.
    top_k: int = Field(0, ge=-1)  # -1 or 0 = disabled
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is None:
            return value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if not all(0 < len(s) <= MAX_STOP_STRING_LEN for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_STRING_LEN} characters long")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _parse_logit_bias_keys(cls, value: Any) -> Any:
        # JSON object keys are strings; they must spell token ids.
        if not isinstance(value, dict):
            return value
        parsed = {}
        for key, bias in value.items():
            if isinstance(key, str):
                if not key.strip().lstrip("-").isdigit():
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
                key = int(key)
            parsed[key] = bias
        return parsed

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (empty when absent)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _check_common(self, max_tokens: int | None) -> None:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise FieldError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})"
            )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo (scoring a prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)  # only None or n (= no extra candidates)
    suffix: str | None = None  # unsupported unless empty

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        # Checked by hand so a bad prompt gets one clear message instead of one per union member.
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a non-empty string, list of strings or list of token ids")
        if all(isinstance(p, str) for p in value):
            if not all(value):
                raise ValueError("prompt strings must not be empty")
        elif all(isinstance(p, list) for p in value):
            if not all(value):
                raise ValueError("prompt token-id lists must not be empty")
            for ids in value:
                _check_token_ids("prompt", ids)
        else:
            _check_token_ids("prompt", value)
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of is not supported (only best_of equal to n)")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens must be at least 1 unless echo is true")
        self._check_common(self.max_tokens)
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextContentPart(_StrictModel):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_StrictModel):
    """One input message. `name` is accepted, but ChatML has no place for it, so it is not rendered."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextContentPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"only text content parts are supported, got type {kind!r}")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError('a text content part is {"type": "text", "text": "..."}')
        return value

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ResponseFormat(_StrictModel):
    """`response_format`; only plain text is supported."""

    type: Literal["text"]

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"response_format type {data.get('type')!r} is not supported; only 'text' is")
        return data


def chat_template_input(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the role/content dicts `Tokenizer.apply_chat_template` takes."""
    return [{"role": m.role, "content": m.text} for m in messages]


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None = until the context is full
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        if self.tools:
            raise FieldError("tools", "tools are not supported: this server does not do function calling")
        if self.tool_choice not in (None, "none", "auto"):
            raise FieldError("tool_choice", "tool_choice is not supported: no function calling")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        self._check_common(self.max_tokens_limit)
        return self

    @property
    def max_tokens_limit(self) -> int | None:
        """max_completion_tokens if given, else max_tokens; None = until the context is full."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_StrictModel):
    """POST /tokenize: either a prompt or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        if self.prompt is not None and "add_generation_prompt" in self.model_fields_set:
            raise FieldError("add_generation_prompt", "add_generation_prompt applies only to messages")
        return self


class DetokenizeRequest(_StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId]


# --- responses ---------------------------------------------------------------------------------


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


Logprob = Annotated[float, PlainSerializer(_finite_logprob)]
FinishReason = Literal["stop", "length", "abort", "error"]


def random_id(prefix: str) -> str:
    """A fresh response id such as 'cmpl-<32 hex>'."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Self:
        """Usage with total_tokens filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One choice; in a stream chunk `text` is the delta and finish_reason stays null until the end."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it


class CompletionResponse(BaseModel):
    """Body of a non-streaming /v1/completions response."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of /v1/completions; usage only where stream_options asks for it."""

    usage: UsageInfo | None = None  # type: ignore[assignment]


class TopLogprob(BaseModel):
    """One candidate token with its logprob and raw UTF-8 bytes."""

    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class ChatCompletionLogprob(TopLogprob):
    """The sampled token's logprob entry with its top alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    """`logprobs` of a chat choice."""

    content: list[ChatCompletionLogprob] | None = None


class ChatResponseMessage(BaseModel):
    """The assistant's reply."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    """One choice of a non-streaming chat response."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """Body of a non-streaming /v1/chat/completions response."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """A chunk's delta; absent keys are left out (`{}` in the final chunk), as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of /v1/chat/completions."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "customllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Body of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(BaseModel):
    """Body of POST /tokenize."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    """Body of POST /detokenize."""

    prompt: str


class ErrorInfo(BaseModel):
    """The `error` object of an error response."""

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorInfo

    @classmethod
    def of(
        cls, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: int | str | None = None,
    ) -> Self:
        """An error body from its four parts."""
        return cls(error=ErrorInfo(message=message, type=type, param=param, code=code))


# --- validation errors -------------------------------------------------------------------------


def _param(loc: tuple[int | str, ...]) -> str:
    # ('messages', 0, 'content') -> 'messages[0].content'; pydantic's '[key]' marks a dict key.
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += part if not out or part.startswith("[") else f".{part}"
    return out


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for a request's ValidationError; the message names the offending field."""
    return describe_errors(err.errors(include_url=False))


def describe_errors(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic error dicts (FastAPI's body errors with the leading 'body' removed)."""
    first = errors[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        return f"{cause}{more}", cause.field
    param = _param(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if not param:
        return f"Invalid request body: {msg}{more}", None
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}{more}", param
    if first["type"] == "missing":
        return f"Missing required argument: {param}{more}", param
    value = first.get("input")
    # Show scalar inputs; lists and long strings would drown the message.
    short = isinstance(value, int | float | bool | None) or (isinstance(value, str) and len(value) <= 40)
    got = f" (got {value!r})" if short else ""
    return f"Invalid value for '{param}': {msg}{got}{more}", param
