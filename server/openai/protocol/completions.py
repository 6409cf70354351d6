"""POST /v1/completions: the request, its choices, the response and the stream chunk."""

from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_validator,
)

from server.openai.protocol.common import (
    MAX_LOGPROBS,
    FieldError,
    FinishReason,
    Logprob,
    RoutedExpertsChoice,
    SamplingRequest,
    TokenId,
    UsageInfo,
    check_token_ids,
    now,
    random_id,
)
from server.openai.protocol.structured import StructuredOutputs


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo (scoring a prompt)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's extra: each prompt token's logprob (and its top alternatives) in the choice's prompt_logprobs.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)  # only None or n (= no extra candidates)
    suffix: str | None = None  # unsupported unless empty
    structured_outputs: StructuredOutputs | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        # Checked by hand so a bad prompt gets one clear message instead of one per union member.
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("prompt must be a non-empty string, list of strings or list of token ids")
        if all(isinstance(p, str) for p in value):
            if not all(value):
                raise ValueError("prompt strings must not be empty")
        elif all(isinstance(p, list) for p in value):
            if not all(value):
                raise ValueError("prompt token-id lists must not be empty")
            for ids in value:
                check_token_ids("prompt", ids)
        else:
            check_token_ids("prompt", value)
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> Self:
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", "best_of is not supported (only best_of equal to n)")
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported")
        if self.continue_final_message:
            raise FieldError("continue_final_message", "continue_final_message applies only to chat completions")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens must be at least 1 unless echo is true")
        self._check_common(self.max_tokens)
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each item is text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Logprob | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, Logprob] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprobEntry(BaseModel):
    """vLLM's per-token entry of `prompt_logprobs`."""

    logprob: Logprob
    rank: int  # 1 = the most likely token
    decoded_token: str


class CompletionChoice(RoutedExpertsChoice):
    """One choice; in a stream chunk `text` is the delta and finish_reason stays null until the end (and
    routed_experts, when asked for, the rows of this chunk's tokens)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    # vLLM: per prompt token, null for the first, else {token id: entry} of the token itself and the top ones.
    prompt_logprobs: list[dict[str, PromptLogprobEntry] | None] | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """Body of a non-streaming /v1/completions response."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    """One SSE chunk of /v1/completions; usage only where stream_options asks for it."""

    usage: UsageInfo | None = None  # type: ignore[assignment]
