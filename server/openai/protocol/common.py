"""What the request and response models of every endpoint share: strict parsing, the sampling fields,
limits, usage and ids.

Requests reject unknown fields and do no lax coercion ("0.5" is not a number, 1 is not true).
Checks that need the tokenizer or the model (token ids < vocab size, prompt length) belong to the
API layer. Serialize responses with `model_dump()`/`model_dump_json()`, not `exclude_unset`.
"""

import base64
import math
import time
import uuid
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticUndefined

# Same limits as server/engine/sampling_params.py (not imported: this module stays free of torch).
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MIN_LOGPROB = -9999.0  # stands in for -inf, which JSON cannot carry (vLLM does the same)


class FieldError(ValueError):
    """A cross-field validation failure that knows which request field it is about."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class StrictModel(BaseModel):
    # strict: no lax coercion; allow_inf_nan: Python's json accepts NaN/Infinity literals.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema marks most fields nullable ("temperature": null); null takes the default.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].default in (None, PydanticUndefined)
        }


def check_token_ids(name: str, ids: Any) -> None:
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{name} must hold token ids (integers >= 0)")


TokenId = Annotated[int, Field(ge=0)]


# Router-added fields and their no-op values. Other values are a 400, except for the fields honoured:
# no_stop_trim (as include_stop_str_in_output), continue_final_message (chat only; completions refuse it) and
# the reasoning switches (trivially: this model has no reasoning phase to separate, stream or drop).
ROUTER_FIELDS = {"no_stop_trim": False, "return_hidden_states": False, "continue_final_message": False,
                 "separate_reasoning": True, "stream_reasoning": True, "include_reasoning": True}
HONOURED_ROUTER_FIELDS = frozenset({"no_stop_trim", "continue_final_message", "separate_reasoning",
                                    "stream_reasoning", "include_reasoning"})


class StreamOptions(StrictModel):
    """`stream_options`: usage in the last chunk (include_usage) or in every chunk (continuous)."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingExtras(StrictModel):
    """`stop` and the vLLM sampling extras that benchmark and eval clients send, on every generation endpoint
    (/v1/responses too, as vLLM's takes them)."""

    stop: str | list[str] | None = None
    top_k: int = Field(0, ge=-1)  # -1 or 0 = disabled
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is None:
            return value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if not all(0 < len(s) <= MAX_STOP_STRING_LEN for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_STRING_LEN} characters long")
        return value

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (empty when absent)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class SamplingRequest(SamplingExtras):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None = the served model (OpenAI requires it; we are lenient)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    min_tokens: int = Field(0, ge=0)  # vLLM's
    # vLLM's token-id extras: logprobs name tokens 'token_id:N'; the response carries the prompt's and each
    # choice's token ids (streamed: the prompt's in a choice's first chunk, the new ids in each).
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    # SGLang's field (and flag): each choice carries `routed_experts`, every token's top-k routed experts per layer.
    return_routed_experts: bool = False
    # Extras routers add to every request they forward (vllm-router, SGLang's router), at these defaults.
    # no_stop_trim (SGLang: keep the stop string) is honoured as include_stop_str_in_output; the reasoning
    # switches are honoured trivially (this model has no reasoning phase to separate, stream or drop).
    no_stop_trim: bool = False
    return_hidden_states: bool = False
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    include_reasoning: bool = True

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _parse_logit_bias_keys(cls, value: Any) -> Any:
        # JSON object keys are strings; they must spell token ids.
        if not isinstance(value, dict):
            return value
        parsed = {}
        for key, bias in value.items():
            if isinstance(key, str):
                if not key.strip().lstrip("-").isdigit():
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
                key = int(key)
            parsed[key] = bias
        return parsed

    @property
    def keep_stop_string(self) -> bool:
        """include_stop_str_in_output, or SGLang's no_stop_trim."""
        return self.include_stop_str_in_output or self.no_stop_trim

    def _check_common(self, max_tokens: int | None) -> None:
        for name, noop in ROUTER_FIELDS.items():
            if name not in HONOURED_ROUTER_FIELDS and getattr(self, name) != noop:
                raise FieldError(name, f"{name}={getattr(self, name)!r} is not supported (only {noop!r})")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise FieldError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})"
            )


def _finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


Logprob = Annotated[float, PlainSerializer(_finite_logprob)]


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


def random_id(prefix: str) -> str:
    """A fresh response id such as 'cmpl-<32 hex>'."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Self:
        """Usage with total_tokens filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class RoutedExperts(BaseModel):
    """The routed experts of the tokens the model read for a choice, compactly (as SGLang): `data` is the base64 of
    a little-endian int32 array of `shape` [T tokens, L layers, K experts per token], row-major."""

    shape: list[int]
    dtype: Literal["int32"] = "int32"
    data: str

    @classmethod
    def of(cls, rows: np.ndarray) -> Self:
        """The encoding of rows [T, L, K]."""
        raw = np.ascontiguousarray(rows, dtype="<i4").tobytes()
        return cls(shape=list(rows.shape), data=base64.b64encode(raw).decode("ascii"))


class RoutedExpertsChoice(BaseModel):
    """A choice that carries `routed_experts` (last) when the request asked for them, and no such key otherwise."""

    routed_experts: RoutedExperts | None = None

    @model_serializer(mode="wrap")
    def _routed_experts_last_or_absent(self, handler: Any) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        routed = body.pop("routed_experts")
        if routed is not None:
            body["routed_experts"] = routed
        return body


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "customllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Body of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
