"""SpeculativeConfig: `--speculative-config`, vLLM's JSON for speculative decoding (prompt lookup only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# vLLM's defaults for the ngram method when neither lookup bound is given.
_DEFAULT_LOOKUP = 5
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size")


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    """Prompt-lookup (n-gram) drafts of up to num_speculative_tokens tokens, verified in one step.

    A draft continues the latest earlier occurrence of the sequence's last n tokens, for the longest n in
    [prompt_lookup_min, prompt_lookup_max] that has one. No drafts in a step whose running batch holds
    disable_by_batch_size sequences or more (a full batch is compute-bound: verifying drafts costs more than it saves).
    """

    method: str = "ngram"
    num_speculative_tokens: int
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported; this server drafts with "
                             "prompt lookup only: \"method\": \"ngram\"")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size"):
            value = getattr(self, name)
            if value is None and name == "disable_by_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        """Parse vLLM's --speculative-config JSON; ValueError naming what is wrong."""
        try:
            fields: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--speculative-config is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"--speculative-config must be a JSON object, got {text!r}")
        unknown = sorted(set(fields) - set(_KEYS))
        if unknown:
            raise ValueError(f"--speculative-config: unsupported key(s) {', '.join(unknown)}; this server reads "
                             f"{', '.join(_KEYS)}")
        if "method" not in fields:
            raise ValueError("--speculative-config needs \"method\": \"ngram\"")
        if "num_speculative_tokens" not in fields:
            raise ValueError("--speculative-config needs \"num_speculative_tokens\"")
        # As vLLM: one bound given stands for both.
        lo, hi = fields.get("prompt_lookup_min"), fields.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = _DEFAULT_LOOKUP
        fields["prompt_lookup_min"] = hi if lo is None else lo
        fields["prompt_lookup_max"] = lo if hi is None else hi
        return cls(**fields)
