"""POST /v1/chat/completions: messages, the request, its choices, the response and the stream chunk."""

import json
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
    RoutedExpertsChoice,
    SamplingRequest,
    StrictModel,
    UsageInfo,
    now,
    random_id,
)
from server.openai.protocol.structured import GrammarRequest, ResponseFormat, StructuredOutputs
from server.openai.protocol.tools import (
    MAX_TOOLS,
    ChatTool,
    DeltaToolCall,
    NamedToolChoice,
    ToolCall,
    ToolCallOut,
    ToolChoice,
)


class TextContentPart(StrictModel):
    """One part of a message's content; only text is supported."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One input message. `name` is accepted, but ChatML has no place for it, so it is not rendered.

    An assistant message may carry `tool_calls` (and then no content); a `tool` message answers one of them.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # echoed back by SDKs in assistant turns; not rendered

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if isinstance(value, str) or value is None:
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

    @model_validator(mode="after")
    def _check_role_fields(self) -> Self:
        if self.tool_calls is not None and self.role != "assistant":
            raise FieldError("tool_calls", f"only assistant messages carry tool_calls, not {self.role!r} ones")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise FieldError("content", f"a {self.role} message needs content")
        if self.role == "tool" and self.tool_call_id is None:
            raise FieldError("tool_call_id", "a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise FieldError("tool_call_id", "only tool messages carry tool_call_id")
        return self

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines; '' when absent)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


def chat_template_input(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the dicts chat templates take: role ("developer" renders as system) and content, plus tool_calls
    (arguments parsed from JSON where they are JSON, as Hugging Face templates expect) and tool_call_id."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name,
                                                "arguments": _parsed_arguments(c.function.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def _parsed_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


ChatToolChoice = Literal["none", "auto", "required", "named"]


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None = until the context is full
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # None = "auto" with tools, "none" without
    parallel_tool_calls: bool = True
    # OpenAI fields that change nothing here (accepted) or cannot be honoured (rejected below).
    store: bool = False
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # a latency hint; the output does not depend on it
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None  # no reasoning phase here
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM's chat extras.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.store:
            raise FieldError("store", "store: true is not supported: this server keeps no completions")
        if self.modalities is not None and self.modalities != ["text"]:
            raise FieldError("modalities", f"modalities {self.modalities} are not supported: only ['text']")
        if self.audio is not None:
            raise FieldError("audio", "audio output is not supported (audio must be absent)")
        if self.web_search_options is not None:
            raise FieldError("web_search_options", "web_search_options is not supported: this server has no web search")
        if self.response_format is not None and self.response_format.type != "text" and self.structured_outputs:
            raise FieldError("structured_outputs", "give either response_format or structured_outputs, not both")
        self._check_tools()
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise FieldError("continue_final_message",
                                 "continue_final_message needs add_generation_prompt to be false")
            if self.messages[-1].role != "assistant":
                raise FieldError("continue_final_message",
                                 "continue_final_message needs the last message to be the assistant's")
        self._check_common(self.max_tokens_limit)
        return self

    def _check_tools(self) -> None:
        choice = self.effective_tool_choice
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tools must have distinct function names")
        if choice in ("required", "named") and not names:
            raise FieldError("tool_choice", f"tool_choice {choice!r} needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise FieldError("tool_choice", f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                            f"which is not in tools ({', '.join(names)})")
        if choice in ("required", "named") and self.grammar_request() is not None:
            raise FieldError("tool_choice", f"tool_choice {choice!r} cannot be combined with response_format "
                                            "or structured_outputs")

    @property
    def effective_tool_choice(self) -> ChatToolChoice:
        """tool_choice with its default filled in; a named function is "named"."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    def grammar_request(self) -> GrammarRequest | None:
        """The output constraint from response_format or structured_outputs (tools are handled apart)."""
        if self.structured_outputs is not None:
            return self.structured_outputs.to_grammar()
        return self.response_format.grammar() if self.response_format is not None else None

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
    tool_calls: list[ToolCallOut] | None = None  # left out when there are none

    @model_serializer(mode="wrap")
    def _drop_no_tool_calls(self, handler: Any) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)
        return body


class ChatCompletionChoice(RoutedExpertsChoice):
    """One choice of a non-streaming chat response."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionResponse(BaseModel):
    """Body of a non-streaming /v1/chat/completions response."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class DeltaMessage(BaseModel):
    """A chunk's delta; absent keys are left out (`{}` in the final chunk), as OpenAI sends them."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(RoutedExpertsChoice):
    """One choice of a chat stream chunk (routed_experts, when asked for: the rows of this chunk's tokens)."""

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids: this chunk's new ones


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of /v1/chat/completions."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: in the first chunk
