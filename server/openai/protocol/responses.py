"""POST /v1/responses: the request, and what a stateless server refuses (input items: responses_input.py).

Nothing is stored: an omitted `store` means "not stored" (OpenAI's default is true), `store: false` is accepted,
and what needs stored state (`store: true`, `previous_response_id`, `conversation`, `background`) is a 400.
"""

from typing import Any, Literal, Self

from pydantic import Field, PrivateAttr, model_validator

from server.openai.protocol.chat import ChatMessage
from server.openai.protocol.common import MAX_LOGPROBS, FieldError, SamplingExtras, StrictModel
from server.openai.protocol.responses_input import conversation, validate_as
from server.openai.protocol.structured import NAME_PATTERN, GrammarRequest
from server.openai.protocol.tools import MAX_TOOLS, ChatTool, FunctionDefinition

MAX_METADATA_KEYS = 16  # OpenAI's limits on `metadata`
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512
LOGPROBS_INCLUDE = "message.output_text.logprobs"

# Fields a stateless server cannot honour, and why; each is a 400 naming it when set.
_STATEFUL = {
    "previous_response_id": "previous_response_id is not supported: this server is stateless and stores no "
                            "responses; send the whole conversation as input",
    "conversation": "conversation is not supported: this server is stateless and stores no conversations",
    "prompt": "prompt (a stored prompt template) is not supported: this server stores no prompts",
    "context_management": "context_management is not supported: this server keeps no context between requests",
}


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


class ResponsesRequest(SamplingExtras):
    """POST /v1/responses; with `stop` and vLLM's sampling extras, which vLLM's Responses request takes too."""

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
        if self.truncation == "auto":
            raise FieldError("truncation", "truncation 'auto' is not supported: input that does not fit the "
                                           "context is a 400 (truncation 'disabled')")
        if self.max_tool_calls is not None:
            raise FieldError("max_tool_calls", "max_tool_calls is not supported (leave it out): this server runs "
                                               "no built-in tools, and parallel_tool_calls: false allows one call")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        self._check_metadata()
        self._tools = [validate_as(FunctionTool, t, f"tools[{i}]", _tool_type_error) for i, t in
                       enumerate(self.tools or ())]
        self._texts += [(f"tools[{i}].description", t.description) for i, t in enumerate(self._tools) if t.description]
        self._check_tool_choice()
        self._check_logprobs()
        self._messages = conversation(self.instructions, self.input, self._texts)
        return self

    def _check_logprobs(self) -> None:
        other = [i for i in self.include or () if i != LOGPROBS_INCLUDE]
        if other:
            raise FieldError("include", f"include {other} is not supported: of the extra output data, this server "
                                        f"has only {LOGPROBS_INCLUDE!r}")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", f"top_logprobs needs include [{LOGPROBS_INCLUDE!r}] (the logprobs "
                                             "it gives alternatives to)")
        if self.logprobs and self.effective_tool_choice != "none" and self._tools:
            raise FieldError("include", f"include {LOGPROBS_INCLUDE!r} is not supported with tools in play (text "
                                        "and calls come from one token stream); send tool_choice 'none' or no tools")

    @property
    def logprobs(self) -> bool:
        """Whether the output text carries its tokens' logprobs (with top_logprobs alternatives)."""
        return LOGPROBS_INCLUDE in (self.include or ())

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
            choice = validate_as(FunctionToolChoice, self.tool_choice, "tool_choice", _tool_type_error)
            if choice.name not in names:
                raise FieldError("tool_choice", f"tool_choice names the function {choice.name!r}, which is not "
                                                f"in tools ({', '.join(names)})")
        kind = self.effective_tool_choice
        if kind in ("required", "named") and not names:
            raise FieldError("tool_choice", f"tool_choice {kind!r} needs tools")
        if kind in ("required", "named") and self.grammar_request() is not None:
            raise FieldError("tool_choice", f"tool_choice {kind!r} cannot be combined with a text.format "
                                            "other than text")

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


def _tool_type_error(raw: dict[str, Any], where: str) -> FieldError | None:
    kind = raw.get("type")
    if kind == "function":
        return None
    return FieldError(f"{where}.type", f"{where} of type {kind!r} is not supported: this server runs no built-in "
                                       "tools (web search, file search, computer use, code interpreter, MCP, image "
                                       "generation, ...); only function tools")
