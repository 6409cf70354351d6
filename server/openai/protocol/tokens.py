"""POST /tokenize and POST /detokenize."""

from typing import Self

from pydantic import (
    BaseModel,
    model_validator,
)

from server.openai.protocol.chat import ChatMessage
from server.openai.protocol.common import (
    FieldError,
    StrictModel,
    TokenId,
)
from server.openai.protocol.tools import ChatTool


class TokenizeRequest(StrictModel):
    """POST /tokenize: either a prompt or chat messages (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None  # rendered into the prompt as chat completions would
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "give exactly one of prompt or messages")
        if self.prompt is not None and "add_generation_prompt" in self.model_fields_set:
            raise FieldError("add_generation_prompt", "add_generation_prompt applies only to messages")
        if self.prompt is not None and self.tools is not None:
            raise FieldError("tools", "tools apply only to messages")
        return self


class DetokenizeRequest(StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId]


class TokenizeResponse(BaseModel):
    """Body of POST /tokenize."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    """Body of POST /detokenize."""

    prompt: str
