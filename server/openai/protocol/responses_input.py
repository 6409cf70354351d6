"""The input items of POST /v1/responses, turned into chat messages.

Items are parsed one by one rather than as a pydantic union: a union's errors name the member they tried
(`input.list[...].0.function_call.name`), these name the field the client sent (`input[0].name`).
"""

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from server.openai.protocol.chat import ChatMessage
from server.openai.protocol.common import FieldError, StrictModel
from server.openai.protocol.errors import describe_validation_error
from server.openai.protocol.tools import FunctionCall, ToolCall

# Content parts per type: the fields each may carry.
_PART_FIELDS = {"input_text": {"type", "text"}, "output_text": {"type", "text", "annotations", "logprobs"},
                "refusal": {"type", "refusal"}}
M = TypeVar("M", bound=StrictModel)


def conversation(instructions: str | None, input: str | list[dict[str, Any]],
                 texts: list[tuple[str, str]]) -> list[ChatMessage]:
    """`instructions` and `input` as chat messages: a system turn, then the items in order, consecutive function
    calls joined into one assistant turn (as chat carries them). Each text also goes to `texts`, with its field."""
    messages: list[ChatMessage] = []
    if instructions is not None:
        texts.append(("instructions", instructions))
        messages.append(ChatMessage(role="system", content=instructions))
    if isinstance(input, str):
        texts.append(("input", input))
        return [*messages, ChatMessage(role="user", content=input)]
    if not input:
        raise FieldError("input", "input must hold at least one item")
    for i, item in enumerate(input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            msg = validate_as(MessageItem, item, where)
            text = _content_text(msg.content, msg.role, f"{where}.content")
            texts.append((f"{where}.content", text))
            messages.append(ChatMessage(role=msg.role, content=text))
        elif kind == "function_call":
            call = validate_as(FunctionCallItem, item, where)
            texts.append((f"{where}.arguments", call.arguments))
            tool_call = ToolCall(id=call.call_id, function=FunctionCall(name=call.name, arguments=call.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or ()), tool_call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[tool_call]))
        elif kind == "function_call_output":
            result = validate_as(FunctionCallOutputItem, item, where)
            text = _content_text(result.output, "tool", f"{where}.output")
            texts.append((f"{where}.output", text))
            messages.append(ChatMessage(role="tool", content=text, tool_call_id=result.call_id))
        else:
            raise FieldError(f"{where}.type", f"input items of type {kind!r} are not supported: only message, "
                                              "function_call and function_call_output (this server is "
                                              "stateless and takes text only)")
    return messages


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


def validate_as(model: type[M], raw: Any, where: str,
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
