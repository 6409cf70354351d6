"""Constrained output requests: OpenAI's `response_format` and vLLM's `structured_outputs` extra.

Both are turned into one `GrammarRequest` (what to constrain to, and the request field it came in), which the
serving layer hands to the grammar backend (server/engine/grammar.py). This module only checks the shape of
the request; whether a schema or grammar compiles is the backend's call, answered with a 400 naming the field.
"""

import json
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from server.openai.protocol.common import FieldError, StrictModel

# OpenAI's rule for response_format.json_schema.name (and function names).
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_CHOICES = 256
MAX_GRAMMAR_CHARS = 64 << 10

GrammarKind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class GrammarRequest:
    """What one request constrains its output to. `source` is text that equal specs share a cache entry by: a JSON
    schema as serialised from the request (never with sorted keys: its properties are written in the order given,
    as OpenAI's Structured Outputs do), a regex, a JSON list of choices, or a Lark/GBNF grammar."""

    kind: GrammarKind
    source: str
    field: str  # the request field it came in, named by a 400 when it does not compile

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, field: str) -> Self:
        """A JSON schema constraint (a bool schema is JSON Schema's 'anything' / 'nothing')."""
        return cls("json", json.dumps(schema, ensure_ascii=False), field)


def check_schema(value: Any, field: str) -> dict[str, Any]:
    """A JSON schema as a dict: given as an object or as a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FieldError(field, f"{field} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FieldError(field, f"{field} must be a JSON schema object")
    return value


class JsonSchemaFormat(StrictModel):
    """`response_format.json_schema`: a named schema; `strict` is accepted (the schema is always enforced)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = StrictModel.model_config | {"populate_by_name": True}


class ResponseFormat(StrictModel):
    """`response_format`: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> Self:
        if self.type == "json_schema" and self.json_schema is None:
            raise FieldError("json_schema", "response_format of type json_schema needs json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise FieldError("json_schema",
                             f"json_schema is only allowed with type json_schema, not {self.type!r}")
        return self

    def grammar(self) -> GrammarRequest | None:
        """The constraint it asks for (None for text)."""
        if self.type == "json_object":
            return GrammarRequest.json_schema({"type": "object"}, "response_format")
        if self.type == "json_schema":
            assert self.json_schema is not None
            schema = self.json_schema.schema_
            # OpenAI treats an absent schema as any JSON object.
            return GrammarRequest.json_schema(schema if schema is not None else {"type": "object"},
                                              "response_format.json_schema.schema")
        return None


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs` extra: exactly one of json, regex, choice, grammar or json_object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None

    model_config = StrictModel.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            names = ", ".join(g.rstrip("_") for g in given) or "none"
            raise FieldError("", "structured_outputs takes exactly one of json, regex, choice, "
                                                   f"grammar or json_object (got {names})")
        if self.choice is not None and not all(self.choice):
            raise FieldError("choice", "structured_outputs.choice must not hold empty strings")
        return self

    def to_grammar(self) -> GrammarRequest:
        """The constraint it asks for."""
        if self.json_ is not None:
            field = "structured_outputs.json"
            return GrammarRequest.json_schema(check_schema(self.json_, field), field)
        if self.regex is not None:
            # Checked by the grammar backend (its regex dialect is Rust's, not Python's re).
            return GrammarRequest("regex", self.regex, "structured_outputs.regex")
        if self.choice is not None:
            return GrammarRequest("choice", json.dumps(self.choice, ensure_ascii=False), "structured_outputs.choice")
        if self.grammar is not None:
            return GrammarRequest("grammar", self.grammar, "structured_outputs.grammar")
        return GrammarRequest.json_schema({"type": "object"}, "structured_outputs.json_object")
