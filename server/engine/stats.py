"""What the engine reports to metrics: one object per step (from the scheduler) and one per finished sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """The state after one step; `num_new_*` count since the previous step's stats."""

    num_batched_tokens: int
    num_running_reqs: int  # requests (not samples) with a sample in the running batch
    num_waiting_reqs: int  # requests added and not finished that have none running (queued, preempted, in the inbox)
    kv_cache_usage: float  # fraction of cache blocks held by running sequences
    num_new_preemptions: int
    num_new_prefix_queries: int  # prompt tokens looked up in the prefix cache at admission
    num_new_prefix_hits: int  # of which found
    expert_counts: list[list[int]] | None = None  # this step's tokens per [layer][routed expert]
    spec_decoding: SpecDecodingStats | None = None  # drafts verified since the previous stats, None if none


@dataclass(slots=True)
class SpecDecodingStats:
    """Speculative drafts verified (vLLM's spec_decode metrics): one draft = one sequence's drafts of one step."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Entry j: drafts whose token at position j was kept (a kept token's predecessors were all kept).
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def add(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's drafts of one step, of which the first num_accepted were kept."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for j in range(num_accepted):
            per_pos[j] += 1


@dataclass(frozen=True, slots=True)
class FinishedStats:
    """One finished sample; times in seconds, None where it never got that far."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_time: float | None
    time_to_first_token: float | None
    e2e_latency: float
