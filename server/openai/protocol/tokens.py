"""POST /tokenize, POST /detokenize and GET /tokenizer_info."""

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
    # vLLM's fields. add_special_tokens: what the tokenizer's post-processor adds (a BOS, say); the default is what
    # the generation endpoints feed the model, which add nothing (vLLM's default for a prompt is true).
    add_special_tokens: bool = False
    return_token_strs: bool = False  # the vocabulary strings of the tokens, in `token_strs`

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
    """Body of POST /tokenize; token_strs only when asked for (left out otherwise)."""

    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    """Body of POST /detokenize."""

    prompt: str


class TokenizerInfoResponse(BaseModel):
    """Body of GET /tokenizer_info: vLLM's fields (a tokenizer_config.json's) plus the special tokens' ids."""

    tokenizer_class: str
    eos_token: str
    eos_token_id: int
    bos_token: str | None
    bos_token_id: int | None
    model_max_length: int
    chat_template: str
