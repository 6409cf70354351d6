"""POST /v1/responses: the request, its input items (turned into chat messages), and what a stateless server refuses.

Input items are parsed here, item by item, rather than as a pydantic union: a union's errors name the member they
tried (`input.list[...].0.function_call.name`), while these name the field the client sent (`input[0].name`).
Nothing is stored: an omitted `store` means "not stored" (OpenAI's default is true), `store: false` is accepted,
and what needs stored state (`store: true`, `previous_response_id`, `conversation`, `background`) is a 400.
"""

from collections.abc import Callable
from typing import Any, Literal, Self, TypeVar

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from server.openai.protocol.chat import ChatMessage
from server.openai.protocol.common import MAX_LOGPROBS, FieldError, StrictModel
from server.openai.protocol.errors import describe_validation_error
from server.openai.protocol.structured import NAME_PATTERN, GrammarRequest
from server.openai.protocol.tools import MAX_TOOLS, ChatTool, FunctionCall, FunctionDefinition, ToolCall

MAX_METADATA_KEYS = 16  # OpenAI's limits on `metadata`
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512

# Fields a stateless server cannot honour, and why; each is a 400 naming it when set.
_STATEFUL = {
    "previous_response_id": "previous_response_id is not supported: this server is stateless and stores no "
                            "responses; send the whole conversation as input",
    "conversation": "conversation is not supported: this server is stateless and stores no conversations",
    "prompt": "prompt (a stored prompt template) is not supported: this server stores no prompts",
    "context_management": "context_management is not supported: this server keeps no context between requests",
}
# Content parts per type: the fields each may carry.
_PART_FIELDS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"},
                "refusal": {"type", "refusal"}}


M = TypeVar("M", bound=StrictModel)


class FunctionTool(StrictModel):
    """A `tools` entry: Responses' flat function tool (no `function` wrapper, unlike chat's)."""

    type: Literal["function"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> ChatTool:
        """The same tool in chat's shape, as chat templates and the tool-call grammar take it."""
        return ChatTool(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict))


class FunctionToolChoice(StrictModel):
    """`tool_choice: {"type": "function", "name": ...}`."""

    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    """`text.format`: plain text, any JSON object, or JSON matching a named schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # accepted: the schema is always enforced

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _fields_of_type(self) -> Self:
        if self.type == "json_schema":
            if self.name is None:
                raise FieldError("name", "a json_schema format needs a name")
            if self.schema_ is None:
                raise FieldError("schema", "a json_schema format needs a schema")
        else:
            given = [f for f in ("name", "schema_", "description", "strict") if getattr(self, f) is not None]
            if given:
                raise FieldError(given[0].rstrip("_"), f"{given[0].rstrip('_')} is only allowed with type "
                                                       f"json_schema, not {self.type!r}")
        return self

    def grammar(self) -> GrammarRequest | None:
        if self.type == "json_object":
            return GrammarRequest.json_schema({"type": "object"}, "text.format")
        if self.type == "json_schema":
            assert self.schema_ is not None
            return GrammarRequest.json_schema(self.schema_, "text.format.schema")
        return None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint; this model has one length of answer


class Reasoning(StrictModel):
    """Accepted: this model has no reasoning phase, so there is nothing to spend effort on or summarise."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(StrictModel):
    include_obfuscation: bool = True  # accepted: events carry no obfuscation padding either way


class ResponsesRequest(StrictModel):
    """POST /v1/responses."""

    model: str | None = None  # None = the served model
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)  # None = until the context is full
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # a vLLM extra: replayable sampling
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # the prefix cache is automatic here
    prompt_cache_retention: str | None = None
    store: bool | None = None  # None = not stored (see the module docstring)
    background: bool = False
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] = "disabled"
    reasoning: Reasoning | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tool_calls: int | None = Field(None, ge=1)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[Any] | None = None

    _tools: list[FunctionTool] = PrivateAttr(default_factory=list)
    _messages: list[ChatMessage] = PrivateAttr(default_factory=list)
    _texts: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        for name, why in _STATEFUL.items():
            if getattr(self, name) is not None:
                raise FieldError(name, why)
        if self.store:
            raise FieldError("store", "store: true is not supported: this server is stateless and stores no "
                                      "responses (send store: false, or leave it out)")
        if self.background:
            raise FieldError("background", "background: true is not supported: responses run while the request "
                                           "is open (there is no stored response to poll)")
        if self.include:
            raise FieldError("include", f"include {self.include} is not supported: this server adds no extra "
                                        "output data (send [] or leave it out)")
        if self.truncation == "auto":
            raise FieldError("truncation", "truncation 'auto' is not supported: input that does not fit the "
                                           "context is a 400 (truncation 'disabled')")
        if self.top_logprobs:
            raise FieldError("top_logprobs", "top_logprobs is not supported on /v1/responses (only 0); "
                                             "/v1/chat/completions returns logprobs")
        if self.max_tool_calls is not None:
            raise FieldError("max_tool_calls", "max_tool_calls is not supported (leave it out): this server runs "
                                               "no built-in tools, and parallel_tool_calls: false allows one call")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        self._check_metadata()
        self._tools = [_validate(FunctionTool, t, f"tools[{i}]", _tool_type_error) for i, t in
                       enumerate(self.tools or ())]
        self._check_tool_choice()
        self._messages = self._conversation()
        return self

    def _check_metadata(self) -> None:
        meta = self.metadata or {}
        if len(meta) > MAX_METADATA_KEYS:
            raise FieldError("metadata", f"metadata takes at most {MAX_METADATA_KEYS} keys, got {len(meta)}")
        for key, value in meta.items():
            if len(key) > MAX_METADATA_KEY_LEN or len(value) > MAX_METADATA_VALUE_LEN:
                raise FieldError("metadata", f"metadata keys take at most {MAX_METADATA_KEY_LEN} characters and "
                                             f"values at most {MAX_METADATA_VALUE_LEN} (key {key[:64]!r})")

    def _check_tool_choice(self) -> None:
        names = [t.name for t in self._tools]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tools must have distinct function names")
        if isinstance(self.tool_choice, dict):
            choice = _validate(FunctionToolChoice, self.tool_choice, "tool_choice", _tool_type_error)
            if choice.name not in names:
                raise FieldError("tool_choice", f"tool_choice names the function {choice.name!r}, which is not "
                                                f"in tools ({', '.join(names)})")
        kind = self.effective_tool_choice
        if kind in ("required", "named") and not names:
            raise FieldError("tool_choice", f"tool_choice {kind!r} needs tools")
        if kind in ("required", "named") and self.grammar_request() is not None:
            raise FieldError("tool_choice", f"tool_choice {kind!r} cannot be combined with a text.format "
                                            "other than text")

    def _conversation(self) -> list[ChatMessage]:
        """`instructions` and `input` as chat messages: a system turn, then the items in order, consecutive
        function calls joined into one assistant turn (as chat carries them)."""
        messages: list[ChatMessage] = []
        if self.instructions is not None:
            self._texts.append(("instructions", self.instructions))
            messages.append(ChatMessage(role="system", content=self.instructions))
        if isinstance(self.input, str):
            self._texts.append(("input", self.input))
            return [*messages, ChatMessage(role="user", content=self.input)]
        if not self.input:
            raise FieldError("input", "input must hold at least one item")
        for i, item in enumerate(self.input):
            where = f"input[{i}]"
            kind = item.get("type", "message")
            if kind == "message":
                msg = _validate(MessageItem, item, where)
                text = _content_text(msg.content, msg.role, f"{where}.content")
                self._texts.append((f"{where}.content", text))
                messages.append(ChatMessage(role=msg.role, content=text))
            elif kind == "function_call":
                call = _validate(FunctionCallItem, item, where)
                self._texts.append((f"{where}.arguments", call.arguments))
                tool_call = ToolCall(id=call.call_id, function=FunctionCall(name=call.name, arguments=call.arguments))
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    last.tool_calls = [*(last.tool_calls or ()), tool_call]
                else:
                    messages.append(ChatMessage(role="assistant", tool_calls=[tool_call]))
            elif kind == "function_call_output":
                result = _validate(FunctionCallOutputItem, item, where)
                text = _content_text(result.output, "tool", f"{where}.output")
                self._texts.append((f"{where}.output", text))
                messages.append(ChatMessage(role="tool", content=text, tool_call_id=result.call_id))
            else:
                raise FieldError(f"{where}.type", f"input items of type {kind!r} are not supported: only message, "
                                                  "function_call and function_call_output (this server is "
                                                  "stateless and takes text only)")
        return messages

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._tools

    @property
    def messages(self) -> list[ChatMessage]:
        """The conversation as chat messages (instructions first)."""
        return self._messages

    @property
    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text the request carries, for the Unicode check that names the field."""
        return self._texts

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required", "named"]:
        if isinstance(self.tool_choice, dict):
            return "named"
        if self.tool_choice is None:
            return "auto" if self._tools else "none"
        return self.tool_choice

    @property
    def named_tool(self) -> str | None:
        return self.tool_choice.get("name") if isinstance(self.tool_choice, dict) else None

    def grammar_request(self) -> GrammarRequest | None:
        """The output constraint from text.format (tools are handled apart)."""
        fmt = self.text.format if self.text is not None else None
        return fmt.grammar() if fmt is not None else None


class MessageItem(StrictModel):
    """An input message (also an earlier response's output message sent back); content is checked apart."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Any
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = None


class FunctionCallItem(StrictModel):
    """A call an earlier response made, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(StrictModel):
    """The result of a call, answering its call_id."""

    type: Literal["function_call_output"]
    call_id: str
    output: Any
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _tool_type_error(raw: dict[str, Any], where: str) -> FieldError | None:
    kind = raw.get("type")
    if kind == "function":
        return None
    return FieldError(f"{where}.type", f"{where} of type {kind!r} is not supported: this server runs no built-in "
                                       "tools (web search, file search, computer use, code interpreter, MCP, image "
                                       "generation, ...); only function tools")


def _validate(model: type[M], raw: Any, where: str,
              precheck: Callable[[dict[str, Any], str], FieldError | None] | None = None) -> M:
    """`raw` parsed as `model`; a FieldError naming the field as the client sent it (`input[2].call_id`)."""
    if not isinstance(raw, dict):
        raise FieldError(where, f"{where} must be an object")
    if precheck is not None and (error := precheck(raw, where)) is not None:
        raise error
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        raise FieldError(f"{where}.{param}" if param else where, f"{where}: {message}") from None


def _content_text(content: Any, role: str, where: str) -> str:
    """The text of a message's (or a call output's) content: a string, or text parts joined by newlines (as chat
    joins them). Assistant turns may carry output_text and refusal parts (refusals are not rendered)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(where, f"{where} must be a string or a list of content parts")
    allowed = ("input_text", "output_text", "refusal") if role == "assistant" else ("input_text",)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in allowed:
            raise FieldError(f"{at}.type", f"content parts of type {kind!r} are not supported in a {role} turn: "
                                           f"only {', '.join(allowed)} (this server takes text only)")
        assert isinstance(part, dict)
        extra = sorted(set(part) - _PART_FIELDS[kind])
        if extra:
            raise FieldError(f"{at}.{extra[0]}", f"Unrecognized argument in a {kind} part: {extra[0]}")
        value = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(value, str):
            raise FieldError(f"{at}.{'refusal' if kind == 'refusal' else 'text'}", f"{at} needs its text as a string")
        if kind != "refusal":
            texts.append(value)
    return "\n".join(texts)
