"""Continuous batching: admission, chunked prefill under a token budget, and preemption.

Each step the scheduler fills one flat batch of at most max_num_batched_tokens tokens:
running decodes first (one token each, so they never stall behind a long prompt, plus the
sequence's speculative drafts where the budget and the cache have room), then the
chunks of running prefills, then new admissions in FCFS order. When the cache is full the
most recently arrived running sequence is preempted and later recomputed from scratch
(cheaply, when its blocks are still in the prefix cache).
"""

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.outputs import SampledToken
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.stats import SchedulerStats, SpecDecodingStats


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one scheduling step and the shape of the paged cache."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    block_size: int = 16
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_blocks * self.block_size < self.max_model_len:
            # Otherwise a sequence of max_model_len tokens could never fit, even alone.
            raise ValueError(
                f"num_blocks * block_size ({self.num_blocks} * {self.block_size} = "
                f"{self.num_blocks * self.block_size} tokens) must be >= max_model_len ({self.max_model_len})"
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's share of a step: num_new_tokens tokens starting at start_pos, of which the last
    len(draft_token_ids) are speculative drafts (a decode's, not yet part of the sequence's tokens)."""

    seq: Sequence
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)
    # Snapshots taken at scheduling time; postprocess() moves the sequence on afterwards.
    start_pos: int = field(init=False)
    is_prefill: bool = field(init=False)
    # Whether this step computes the sequence's last token, so its logits must be sampled.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        seq = self.seq
        num_real = self.num_new_tokens - len(self.draft_token_ids)
        assert 0 < num_real <= seq.num_uncomputed_tokens, f"{seq}: cannot schedule {self.num_new_tokens} tokens"
        assert not self.draft_token_ids or not seq.is_prefill, f"{seq}: drafts on a prefill"
        self.start_pos = seq.num_computed_tokens
        self.is_prefill = seq.is_prefill
        self.samples = seq.num_computed_tokens + num_real == seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """The batch of one step and the sequences preempted to make room for it."""

    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        """Whether there is nothing to run this step."""
        return not self.scheduled


@dataclass(slots=True)
class SequenceUpdate:
    """One sequence's result of a step: its new token (None for a prompt-only sequence) and how it ended, if it did."""

    seq: Sequence
    sampled: SampledToken | None
    finish_reason: str | None


def check_stop(seq: Sequence, token_id: int, eos_token_id: int, max_model_len: int) -> str | None:
    """Why seq ends with its newest token, token_id: "stop", "length", or None while it goes on."""
    params = seq.params
    # A constrained sample ends at EOS even with ignore_eos: the grammar allows EOS only once it is complete, and
    # nothing after it.
    eos = token_id == eos_token_id and (not params.ignore_eos or seq.sampling.matcher is not None)
    if token_id in params.stop_token_ids or eos:
        return "stop"
    if seq.num_generated_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    """Chooses each step's batch; sequences move waiting -> running -> finished (or back to waiting)."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        # Must be the clock the engine stamps arrival_time with (first_scheduled_time uses it).
        self.clock = clock
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        # NOTE: kept sorted by (arrival_time, seq_id): serving order is FCFS, preemption takes the tail.
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._reported = (0, 0, 0)  # preemptions, prefix queries, prefix hits as of the last stats
        self._spec_stats = SpecDecodingStats()  # verified drafts since the last stats

    # -- queue management -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for admission (new or preempted)."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding cache blocks."""
        return len(self.running)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (its lengths must already be validated by the engine)."""
        assert seq.status is SequenceStatus.WAITING and not seq.block_table, f"cannot add {seq}"
        max_len = seq.num_prompt_tokens + seq.max_tokens
        # A longer sequence would preempt itself forever once alone in the cache.
        assert max_len <= self.config.max_model_len, (
            f"{seq}: prompt + max_tokens = {max_len} > max_model_len {self.config.max_model_len}"
        )
        self.waiting.append(seq)

    def abort(self, request_id: str | None, index: int | None = None) -> list[Sequence]:
        """Remove, free and finish the sequences of request_id (only sample `index`, if given; every request's if
        request_id is None) and return them, waiting ones first; call between steps."""
        def hit(s: Sequence) -> bool:
            return request_id is None or (s.request_id == request_id and (index is None or s.index == index))

        aborted = [s for s in self.waiting if hit(s)] + [s for s in self.running if hit(s)]
        if not aborted:
            return []
        self.waiting = deque(s for s in self.waiting if not hit(s))
        self.running = [s for s in self.running if not hit(s)]
        for seq in aborted:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        return aborted

    def finish(self, seq: Sequence) -> None:
        """Free and retire a running sequence."""
        assert seq.status is SequenceStatus.RUNNING, f"finish of a non-running {seq}"
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # -- metrics ----------------------------------------------------------------------------

    @property
    def block_usage(self) -> float:
        """Fraction of cache blocks referenced by running sequences."""
        return self.block_manager.usage

    @property
    def num_prefix_queries_tokens(self) -> int:
        """Cumulative tokens looked up in the prefix cache at admission."""
        return self.block_manager.num_prefix_queries_tokens

    @property
    def num_prefix_hit_tokens(self) -> int:
        """Cumulative tokens found in the prefix cache at admission."""
        return self.block_manager.num_prefix_hit_tokens

    def make_stats(self, num_batched_tokens: int, num_running_reqs: int, num_waiting_reqs: int,
                   expert_counts: list[list[int]] | None = None) -> SchedulerStats:
        """The state after a step, for metrics (the request counts are the engine's, which also sees its inbox);
        counters as deltas since the previous call."""
        now = (self.num_preemptions, self.num_prefix_queries_tokens, self.num_prefix_hit_tokens)
        last, self._reported = self._reported, now
        spec, self._spec_stats = self._spec_stats, SpecDecodingStats()
        return SchedulerStats(num_batched_tokens, num_running_reqs, num_waiting_reqs, self.block_usage,
                              now[0] - last[0], now[1] - last[1], now[2] - last[2], expert_counts,
                              spec if spec.num_drafts else None)

    # -- the step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch.

        Ordering rule of `scheduled`: every prefill (is_prefill: more than the last token
        missing; num_new_tokens >= 1) comes before every decode (num_new_tokens == 1, the
        last token is the only one missing). Within each group, running sequences come first
        in arrival order, then sequences admitted this step in admission order.
        """
        budget = self.config.max_num_batched_tokens
        prefills: list[ScheduledSequence] = []
        decodes: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        # One FCFS pass over `running`. A prefill chunk leaves one token of budget for every
        # decode behind it, so decodes never stall behind a long prompt (as long as
        # max_num_batched_tokens >= max_num_seqs; otherwise the latest decodes wait a step).
        num_reserved = sum(1 for s in self.running if not s.is_prefill)
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            assert seq.num_uncomputed_tokens > 0, f"running {seq} has no token to compute"
            is_decode = not seq.is_prefill
            if is_decode:
                # Drafts take what the budget has left after one token for this and every later decode.
                num_new = min(1, budget) + max(0, min(len(seq.spec_token_ids), budget - num_reserved))
            else:
                num_new = min(seq.num_uncomputed_tokens, budget - num_reserved)
            if num_new <= 0:  # out of budget: this one waits for the next step
                if is_decode:
                    num_reserved -= 1
                i += 1
                continue
            if num_new > 1 and is_decode and not self.block_manager.can_append_slots(seq, num_new):
                num_new = 1  # no room for the drafts' slots: decode without them rather than preempt anyone
            while not self.block_manager.can_append_slots(seq, num_new):
                # The victim is the latest arrival: always at or after position i, so never
                # a sequence already scheduled this step.
                victim = self.running.pop()
                if not victim.is_prefill:  # read before _preempt resets its progress
                    num_reserved -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, num_new)
                drafts = seq.spec_token_ids[:num_new - 1] if is_decode else []
                (decodes if is_decode else prefills).append(ScheduledSequence(seq, num_new, drafts))
                budget -= num_new
                if is_decode:
                    num_reserved -= 1
                i += 1
        assert budget >= 0 and num_reserved == 0, f"budget {budget}, reserve {num_reserved}"

        # Admitting right after a preemption would only thrash: the space was just needed.
        if not preempted:
            budget = self._admit(budget, prefills, decodes)

        scheduled = prefills + decodes
        num_batched = sum(s.num_new_tokens for s in scheduled)
        assert num_batched <= self.config.max_num_batched_tokens
        assert len(self.running) <= self.config.max_num_seqs
        return SchedulerOutput(scheduled=scheduled, preempted=preempted, num_batched_tokens=num_batched)

    def _admit(self, budget: int, prefills: list[ScheduledSequence], decodes: list[ScheduledSequence]) -> int:
        """Admit waiting sequences FCFS into the remaining budget; return the budget left."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # FCFS: when the head does not fit, nobody behind it jumps ahead.
            if not bm.can_allocate(seq, budget):
                break
            if self._sibling_prefilling(seq):
                # The n samples of one prompt: wait until a sibling's prompt blocks are in the prefix cache,
                # then share them instead of computing the same prompt n times.
                break
            self.waiting.popleft()
            bm.allocate_prompt(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            bm.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            bisect.insort(self.running, seq, key=_arrival_key)
            scheduled = ScheduledSequence(seq, num_new)
            (prefills if scheduled.is_prefill else decodes).append(scheduled)
            budget -= num_new
        return budget

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """Whether another sequence of seq's request is still computing the prompt seq would share."""
        if not self.config.enable_prefix_caching or seq.num_prompt_tokens < self.config.block_size:
            return False
        return any(s.request_id == seq.request_id and s.num_computed_tokens < s.num_prompt_tokens
                   for s in self.running)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute policy: drop the KV and keep the tokens; a resumed sequence re-prefills
        # prompt + generated tokens, hitting whatever of it is still in the prefix cache.
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, output: SchedulerOutput, num_kept_drafts: dict[int, int] | None = None) -> None:
        """After the forward and after the step's tokens are appended: mark the scheduled tokens whose KV stands
        computed and publish full blocks to the cache. num_kept_drafts: seq_id -> how many of its drafts it kept."""
        for scheduled in output.scheduled:
            seq = scheduled.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran; its blocks are already freed
            num_rejected = 0
            if scheduled.draft_token_ids:
                assert num_kept_drafts is not None, f"{seq}: drafts verified without a count"
                num_rejected = len(scheduled.draft_token_ids) - num_kept_drafts[seq.seq_id]
            # NOTE: rejected drafts' KV lies in slots from num_computed_tokens on: never read (attention reads only
            # computed positions and this step's), never published (commit_computed registers only blocks full of
            # computed tokens), and overwritten when those positions are computed again.
            seq.num_computed_tokens += scheduled.num_new_tokens - num_rejected
            assert seq.num_computed_tokens <= seq.num_tokens, f"{seq} computed past its end"
            if num_rejected:
                # Blocks only the rejected drafts needed go back; the next token's slot stays.
                self.block_manager.release_tail(seq, seq.num_computed_tokens + 1)
            self.block_manager.commit_computed(seq)

    def update_from_output(self, output: SchedulerOutput, sampled: list[SampledToken],
                           eos_token_id: int) -> list[SequenceUpdate]:
        """After the forward: append each sequence's new tokens up to the one that ends it, postprocess, retire
        the sequences that ended (and those with max_tokens 0, whose prompt is now computed). One update per sampled
        or retired sequence."""
        drafts = {s.seq.seq_id: s.draft_token_ids for s in output.scheduled if s.draft_token_ids}
        updates = []
        for item in sampled:
            seq, reason = item.seq, None
            if seq.seq_id in drafts:
                self._spec_stats.add(len(drafts[seq.seq_id]), len(item.token_ids) - 1)
            for i, token_id in enumerate(item.token_ids):
                seq.append_token(token_id)
                reason = check_stop(seq, token_id, eos_token_id, self.config.max_model_len)
                if reason is not None:
                    # Kept drafts after the token that ends the sample are dropped, as if never generated.
                    del item.token_ids[i + 1:]
                    if item.logprobs is not None and item.top_logprobs is not None:
                        del item.logprobs[i + 1:], item.top_logprobs[i + 1:]
                    break
            updates.append(SequenceUpdate(seq, item, reason))
        self.postprocess(output, {item.seq.seq_id: len(item.token_ids) - 1 for item in sampled})
        for update in updates:
            if update.finish_reason is not None:
                self.finish(update.seq)
        for s in output.scheduled:
            if s.samples and s.seq.max_tokens == 0 and s.seq.status is SequenceStatus.RUNNING:
                self.finish(s.seq)
                updates.append(SequenceUpdate(s.seq, None, "length"))
        return updates
