"""SamplingParams: how to pick tokens for one request, validated on construction (errors name the field)."""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

# Temperatures below this are treated as greedy (dividing by them would overflow).
_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _in(value: object, lo: float, hi: float) -> bool:
    # Written as a chained comparison so NaN fails it.
    return _is_num(value) and lo <= value <= hi  # type: ignore[operator]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; immutable and validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Accepts a mapping or (token_id, bias) pairs; stored as sorted pairs.
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    seed: int | None = None
    max_tokens: int = 16  # 0: compute the prompt only (its prompt_logprobs), generate nothing
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token
    # Logprobs of the prompt's tokens (each given the ones before it) with this many top alternatives; such a
    # sequence computes its whole prompt instead of reading the prefix cache.
    prompt_logprobs: int | None = None
    # Each token's top-k routed experts in every layer (SGLang's return_routed_experts); such a sequence, too,
    # computes its whole prompt instead of reading the prefix cache.
    return_routed_experts: bool = False
    # Carried for the detokenizer; the sampler ignores them.
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(_is_int(self.n) and 1 <= self.n <= 16, "n", self.n, "an integer in 1..16")
        _check(_in(self.temperature, 0, 100), "temperature", self.temperature, "in [0, 100]")
        _check(_in(self.top_p, 0, 1) and self.top_p > 0, "top_p", self.top_p, "in (0, 1]")
        _check(
            _is_int(self.top_k) and (self.top_k in (-1, 0) or self.top_k >= 1),
            "top_k", self.top_k, "-1 or 0 (disabled) or a positive integer",
        )
        _check(_in(self.min_p, 0, 1), "min_p", self.min_p, "in [0, 1]")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            _check(_in(value, -2, 2), field, value, "in [-2, 2]")
        rp = self.repetition_penalty
        _check(_is_num(rp) and 0 < rp < math.inf, "repetition_penalty", rp, "> 0 and finite")
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))  # type: ignore[arg-type]
        _check(
            self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            "seed", self.seed, "None or a 64-bit integer",
        )
        _check(_is_int(self.max_tokens) and self.max_tokens >= 0,
               "max_tokens", self.max_tokens, "an integer >= 0")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"an integer in 0..max_tokens ({self.max_tokens})")
        stop_ids = tuple(self.stop_token_ids)
        _check(all(_is_int(t) for t in stop_ids), "stop_token_ids", stop_ids, "integers")
        object.__setattr__(self, "stop_token_ids", stop_ids)
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", self.logprobs, f"None or an integer in 0..{MAX_LOGPROBS}",
        )
        _check(
            self.prompt_logprobs is None
            or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
            "prompt_logprobs", self.prompt_logprobs, f"None or an integer in 0..{MAX_LOGPROBS}",
        )
        _check(isinstance(self.return_routed_experts, bool), "return_routed_experts", self.return_routed_experts,
               "a bool")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in stop), "stop", stop, "non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax instead of drawing."""
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        """True when any of the three repetition-type penalties is active."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    def child(self, index: int) -> "SamplingParams":
        """Params for the index-th of n sequences: n=1 and, if seeded, seed+index so they differ."""
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return replace(self, n=1, seed=seed)

    def validate_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError naming the field if a logit_bias/stop_token_ids id is out of vocab."""
        for field, ids in (("logit_bias", [t for t, _ in self.logit_bias]),  # type: ignore[misc]
                           ("stop_token_ids", self.stop_token_ids)):
            for t in ids:
                _check(0 <= t < vocab_size, field, t, f"a token id in [0, {vocab_size})")


def _normalise_logit_bias(
    bias: Mapping[int | str, float] | Iterable[tuple[int, float]],
) -> tuple[tuple[int, float], ...]:
    # JSON object keys arrive as strings ("50256"), so decimal strings are accepted too.
    items = bias.items() if isinstance(bias, Mapping) else bias
    out: dict[int, float] = {}
    for raw_key, value in items:
        key = int(raw_key) if isinstance(raw_key, str) and raw_key.lstrip("-").isdigit() else raw_key
        _check(_is_int(key), "logit_bias", key, "keyed by integer token ids")
        _check(_in(value, -100, 100), "logit_bias", {key: value}, "values in [-100, 100]")
        out[key] = float(value)  # type: ignore[index]
    return tuple(sorted(out.items()))
