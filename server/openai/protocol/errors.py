"""OpenAI's error body and the translation of pydantic validation errors into it (message, param)."""

from collections.abc import Sequence
from typing import Any, Self

from pydantic import (
    BaseModel,
    ValidationError,
)

from server.openai.protocol.common import (
    FieldError,
)


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
        # A nested model's FieldError names its field relative to that model's place in the request.
        where = _param(first["loc"])
        param = ".".join(p for p in (where, cause.field) if p) or None
        return (f"Invalid value for '{param}': {cause}{more}" if where else f"{cause}{more}"), param
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
