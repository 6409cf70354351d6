"""One generation stream (one sample of a request): its tokens, its sampler state, how many of its tokens have KV in
the cache, and its block table."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from server.engine.routed_experts import RoutedExpertsRecord
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.engine.ngram_drafter import NgramIndex


class SequenceStatus(enum.Enum):
    """Where a sequence is in the scheduler's life cycle."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Prompt plus generated tokens of one stream, with its paged-cache bookkeeping.

    NOTE: invariant 0 <= num_computed_tokens <= num_tokens. Token i has its KV in slot
    block_table[i // block_size] * block_size + i % block_size once i < num_computed_tokens.
    """

    __slots__ = (
        "arrival_time",
        "block_table",
        "first_scheduled_time",
        "first_token_time",
        "index",
        "last_token_time",
        "max_tokens",
        "ngram_index",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "request_id",
        "routed_experts",
        "sampling",
        "seq_id",
        "skip_reading_prefix_cache",
        "spec_token_ids",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        arrival_time: float,
        sampling: SamplingState | None = None,
        index: int = 0,
    ) -> None:
        assert len(prompt_token_ids) > 0, f"seq {seq_id}: empty prompt"
        assert max_tokens >= 0, f"seq {seq_id}: max_tokens={max_tokens} < 0"
        self.seq_id = seq_id
        self.request_id = request_id
        # Copied so the caller's list (e.g. shared by n sequences of one request) is never mutated.
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        # Set until the first token while the prompt's own logits (prompt logprobs) or routing (routed experts) are
        # needed: every prompt token is computed, none is read from the prefix cache (its blocks are still
        # published for others).
        self.skip_reading_prefix_cache = False
        # The per-token routed experts, when the request asked for them.
        self.routed_experts: RoutedExpertsRecord | None = None
        # How to pick its tokens (params, seeded generator, counts for the penalties, grammar); plain sampling with
        # these max_tokens when not given (the scheduler's tests).
        if sampling is None:
            sampling = SamplingState(SamplingParams(max_tokens=max_tokens), prompt_token_ids)
        self.sampling = sampling
        self.index = index  # which of its request's n samples
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        # Speculative decoding: this step's draft tokens (proposed by server/engine/ngram_drafter.py, never part of
        # token_ids until verified) and the n-gram index they come from.
        self.spec_token_ids: list[int] = []
        self.ngram_index: NgramIndex | None = None

    @property
    def params(self) -> SamplingParams:
        """The sampling parameters of this sample."""
        return self.sampling.params

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        """Tokens appended after the prompt."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """A copy of the prompt tokens."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def generated_token_ids(self) -> list[int]:
        """A copy of the generated tokens."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not yet in the cache."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token lacks KV (num_computed_tokens < num_tokens - 1).

        Then the next step runs a prefill chunk. Otherwise exactly the last token is missing
        (a decode step), or nothing is (the step that computed it has just finished).
        A preempted sequence is a prefill again: it recomputes prompt and generated tokens.
        """
        return self.num_computed_tokens < len(self.token_ids) - 1

    def append_token(self, token_id: int) -> None:
        """Append a sampled token (its KV is computed by the next step) and record it for the sampler."""
        self.token_ids.append(token_id)
        self.sampling.append_token(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"status={self.status.name}, num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
