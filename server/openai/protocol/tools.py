"""Function tools on chat completions: definitions and tool_choice (request), tool calls (messages, responses and
stream deltas)."""

from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer

from server.openai.protocol.common import StrictModel
from server.openai.protocol.structured import NAME_PATTERN

MAX_TOOLS = 128


class FunctionDefinition(StrictModel):
    """A function the model may call; `parameters` is a JSON schema (absent = no arguments)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: arguments are always checked against parameters when enforced

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' schema; OpenAI reads an absent one as an empty object."""
        if self.parameters is None:
            return {"type": "object", "properties": {}}
        return self.parameters


class ChatTool(StrictModel):
    """One entry of `tools`; only function tools exist on chat completions."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(StrictModel):
    """A call an earlier assistant turn made (in a request's messages); arguments are JSON text."""

    name: str
    arguments: str


class ToolCall(StrictModel):
    """`messages[i].tool_calls[j]`."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    """A tool call in a response message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class _DropAbsent(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DropAbsent):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropAbsent):
    """One tool-call piece of a stream chunk: `index` always; id, type and name only in a call's first delta."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
