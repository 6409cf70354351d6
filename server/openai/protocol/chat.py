"""POST /v1/chat/completions: messages, the request, its choices, the response and the stream chunk."""

from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from server.openai.protocol.common import (
    MAX_LOGPROBS,
    FieldError,
    FinishReason,
    Logprob,
    SamplingRequest,
    StrictModel,
    UsageInfo,
    now,
    random_id,
)


class TextContentPart(StrictModel):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One input message. `name` is accepted, but ChatML has no place for it, so it is not rendered."""

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
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


class ResponseFormat(StrictModel):
    """`response_format`; only plain text is supported."""

    type: Literal["text"]

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"response_format type {data.get('type')!r} is not supported; only 'text' is")
        return data


def chat_template_input(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the role/content dicts `Tokenizer.apply_chat_template` takes; "developer" renders as system."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None = until the context is full
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    # Router-added (see ROUTER_FIELDS): this server renders no reasoning and never continues the last message.
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    include_reasoning: bool = True

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
    created: int = Field(default_factory=now)
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
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
