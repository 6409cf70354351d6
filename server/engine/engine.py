"""The engine: owns model, cache and scheduler, runs steps on one background thread, streams outputs to asyncio.

Threading: the engine thread is the only one that touches the scheduler, the model and tensors. Other threads
talk to it through `_inbox` (new requests, aborts) under a lock; results go back through each request's
`RequestStream`, whose buffer the engine appends to without ever waiting for the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from server.engine.grammar import CompiledGrammar
from server.engine.model_runner import ModelRunner, SampledToken
from server.engine.sampler_state import PromptLogprob, SamplingState
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.sequence import Sequence, SequenceStatus
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclasses.dataclass
class SequenceOutput:
    """New tokens of one sample (`index` < n) since the last output, and how it ended if it did."""

    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None  # logprob of each new token under the raw model distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # With the sample's first output, if it asked for them: entry i scores prompt token i (None for token 0).
    prompt_logprobs: list[PromptLogprob | None] | None = None


class RequestStream:
    """Outputs of one request, handed from the engine thread to one asyncio consumer.

    The engine only appends to a list and schedules a wake-up, so a slow consumer never slows a step; a
    consumer that falls behind gets several tokens per output (coalesced), not an ever-longer queue of events.
    """

    def __init__(self, request_id: str, num_prompt_tokens: int, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache (first admission)
        self.n = n
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: dict[int, SequenceOutput] = {}
        self._wakeup = asyncio.Event()
        self._num_finished = 0
        self.num_samples_left = n  # engine side: samples not yet finished (changed under the engine's lock)

    def put(self, out: SequenceOutput) -> None:
        """Engine thread: add new tokens of one sample (merged with any the consumer has not taken yet)."""
        with self._lock:
            pending = self._pending.get(out.index)
            if pending is None:
                self._pending[out.index] = out
            else:
                pending.token_ids += out.token_ids
                if out.logprobs is not None and pending.logprobs is not None:
                    pending.logprobs += out.logprobs
                if out.top_logprobs is not None and pending.top_logprobs is not None:
                    pending.top_logprobs += out.top_logprobs
                pending.finish_reason = out.finish_reason
                if out.prompt_logprobs is not None:
                    pending.prompt_logprobs = out.prompt_logprobs
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def __aiter__(self) -> AsyncIterator[list[SequenceOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[SequenceOutput]]:
        """Yield batches of outputs until every sample has finished."""
        while self._num_finished < self.n:
            await self._wakeup.wait()
            with self._lock:
                batch = list(self._pending.values())
                self._pending.clear()
                self._wakeup.clear()
            self._num_finished += sum(1 for o in batch if o.finish_reason is not None)
            if batch:
                yield batch


@dataclasses.dataclass
class _RequestState:
    """Engine-side state of one sample (one Sequence)."""

    stream: RequestStream
    index: int
    params: SamplingParams
    sampling: SamplingState
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None


class Engine:
    """Continuous-batching engine. `add_request` and `abort` are safe from any thread."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig, vocab_size: int,
                 metrics: ServerMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        max_positions = runner.model.config.max_position_embeddings
        if config.max_model_len > max_positions:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings "
                             f"{max_positions}")
        self.runner = runner
        self.config = config
        self.vocab_size = vocab_size
        self.metrics = metrics
        self.clock = clock
        self.scheduler = Scheduler(config, clock=clock)
        self.eos_token_id = runner.eos_token_id
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: list[Sequence] = []
        self._aborts: list[tuple[str | None, int | None, str]] = []  # request id None: every request
        self._stopping = False
        self._closed = False  # set under _lock once the thread takes no more requests (stopped or died)
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None
        self.num_steps = 0
        self._num_unfinished = 0
        self._num_unfinished_requests = 0
        self._num_running_requests = 0  # requests with a sample in the running batch, as of the last step
        self._last_preemptions = 0
        self._last_prefix = (0, 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None, "engine already started"
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread; unfinished requests end with finish_reason "abort"."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    @property
    def num_unfinished(self) -> int:
        """Requests' samples added and not yet finished (waiting, running or in the inbox)."""
        return self._num_unfinished

    @property
    def num_requests_running(self) -> int:
        """Requests (not samples) with a sample in the running batch, as of the last step."""
        return min(self._num_running_requests, self._num_unfinished_requests)

    @property
    def num_requests_waiting(self) -> int:
        """Requests (not samples) added and not yet finished that have no sample running: queued, preempted or
        not yet seen by the engine thread. What --max-queued-requests bounds; an n=8 request counts once."""
        return max(self._num_unfinished_requests - self._num_running_requests, 0)

    # -- requests (any thread) -----------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the problem, for a request this engine cannot serve."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        params.validate_token_ids(self.vocab_size)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.config.max_model_len} tokens, but "
                             f"the prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens} "
                             f"({total} in total); shorten the prompt or lower max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    grammar: CompiledGrammar | None = None) -> RequestStream:
        """Queue a request (n samples) and return the stream of its outputs. Call from an asyncio loop.

        With a grammar, each sample gets its own matcher and its output is constrained to it."""
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine is not running")
        self.validate(prompt_token_ids, params)
        stream = RequestStream(request_id, len(prompt_token_ids), params.n, asyncio.get_running_loop())
        now = self.clock()
        seqs = []
        for index in range(params.n):
            child = params.child(index) if params.n > 1 else params
            matcher = grammar.new_matcher() if grammar is not None else None
            sampling = SamplingState(child, prompt_token_ids, self.runner.device, matcher)
            state = _RequestState(stream, index, child, sampling, now)
            seqs.append(Sequence(next(self._seq_ids), request_id, prompt_token_ids, child.max_tokens, now, state))
            seqs[-1].skip_reading_prefix_cache = child.prompt_logprobs is not None
        with self._lock:
            # Checked again under the lock: the thread may have died since the check above, after which
            # nothing would ever take this request from the inbox.
            if self._closed:
                raise EngineDeadError(self.dead_reason or "engine is not running")
            self._inbox.extend(seqs)
            self._num_unfinished += len(seqs)
            self._num_unfinished_requests += 1
        self._wakeup.set()
        return stream

    def abort(self, request_id: str, index: int | None = None, reason: str = "abort") -> None:
        """End a request (or one of its samples) at the next step boundary; unknown ids are ignored."""
        with self._lock:
            self._aborts.append((request_id, index, reason))
        self._wakeup.set()

    def abort_all(self, reason: str = "abort") -> None:
        """End every unfinished request at the next step boundary (the drain's timeout)."""
        with self._lock:
            self._aborts.append((None, None, reason))
        self._wakeup.set()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_inbox()
                if not self.scheduler.has_unfinished():
                    self._report_step(0)
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                self.step()
        except BaseException as exc:
            self.dead_reason = f"engine thread failed: {type(exc).__name__}: {exc}"
            logger.exception("engine thread failed; failing every request")
            self._fail_all("error")
            return
        self._fail_all("abort")

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq in inbox:
            self.scheduler.add(seq)
        for request_id, index, reason in aborts:
            self._abort_now(request_id, index, reason)

    def _abort_now(self, request_id: str | None, index: int | None, reason: str) -> None:
        seqs = [s for s in itertools.chain(self.scheduler.waiting, self.scheduler.running)
                if request_id is None
                or (s.request_id == request_id and (index is None or s.data.index == index))]  # type: ignore[attr-defined]
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.scheduler.finish(seq)
            else:
                self.scheduler.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
            self._finished(seq, reason)

    def step(self) -> None:
        """Schedule one batch, run it, hand out its tokens."""
        out = self.scheduler.schedule()
        self._num_running_requests = len({s.request_id for s in self.scheduler.running})
        if out.is_empty:
            self._wakeup.wait(timeout=0.01)  # nothing fits right now (e.g. after preempting everything)
            return
        try:
            sampled, expert_counts = self.runner.execute(out.scheduled)
        except Exception:
            # Only the requests in this step fail; the engine keeps serving the others.
            logger.exception("model step failed; failing its %d sequences", len(out.scheduled))
            for s in out.scheduled:
                if s.seq.status is SequenceStatus.RUNNING:
                    self.scheduler.finish(s.seq)
                    self._finished(s.seq, "error")
            return
        self.scheduler.postprocess(out)
        self.num_steps += 1
        now = self.clock()
        for item in sampled:
            self._append(item, now)
        for s in out.scheduled:
            if s.samples and s.seq.max_tokens == 0 and s.seq.status is SequenceStatus.RUNNING:
                self._finish_prompt_only(s.seq)
        self._report_step(out.num_batched_tokens, expert_counts)

    def _finish_prompt_only(self, seq: Sequence) -> None:
        """End a max_tokens 0 sequence whose prompt is computed: its prompt logprobs, no token, "length"."""
        state: _RequestState = seq.data  # type: ignore[assignment]
        self.scheduler.finish(seq)
        self._count_finished(seq, "length")
        lp: list[float] | None = [] if state.params.logprobs is not None else None
        state.stream.put(SequenceOutput(state.index, [], lp, [] if lp is not None else None, "length",
                                        self._take_prompt_logprobs(seq)))

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[PromptLogprob | None] | None:
        """The prompt logprobs, once, when the prompt is computed; the prefix cache is read again afterwards."""
        sampling: SamplingState = seq.data.sampling  # type: ignore[attr-defined]
        entries, sampling.prompt_logprobs = sampling.prompt_logprobs, None
        seq.skip_reading_prefix_cache = False
        return entries

    def _append(self, item: SampledToken, now: float) -> None:
        seq = item.scheduled.seq
        state: _RequestState = seq.data  # type: ignore[assignment]
        if seq.num_generated_tokens == 0 and seq.num_preemptions == 0:
            state.stream.num_cached_tokens = seq.num_cached_tokens
        seq.append_token(item.token_id)
        state.sampling.append_token(item.token_id)
        if state.first_token_time is None:
            state.first_token_time = now
        elif self.metrics is not None and state.last_token_time is not None:
            self.metrics.observe_token_latency(now - state.last_token_time)
        state.last_token_time = now
        params = state.params
        reason = None
        # A constrained sample ends at EOS even with ignore_eos: the grammar allows EOS only once it is complete,
        # and nothing after it.
        constrained = state.sampling.matcher is not None
        eos = item.token_id == self.eos_token_id and (not params.ignore_eos or constrained)
        if item.token_id in params.stop_token_ids or eos:
            reason = "stop"
        elif seq.num_generated_tokens >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            reason = "length"
        output = SequenceOutput(state.index, [item.token_id],
                                [item.logprob] if item.logprob is not None else None,
                                [item.top_logprobs] if item.top_logprobs is not None else None, reason,
                                self._take_prompt_logprobs(seq) if seq.num_generated_tokens == 1 else None)
        if reason is not None:
            self.scheduler.finish(seq)
            self._count_finished(seq, reason)
        state.stream.put(output)

    def _finished(self, seq: Sequence, reason: str) -> None:
        """End a sample that produced no token this step (abort, error, shutdown)."""
        state: _RequestState = seq.data  # type: ignore[assignment]
        self._count_finished(seq, reason)
        state.stream.put(SequenceOutput(state.index, [], [] if state.params.logprobs is not None else None,
                                        [] if state.params.logprobs is not None else None, reason))

    def _count_finished(self, seq: Sequence, reason: str) -> None:
        state: _RequestState = seq.data  # type: ignore[assignment]
        with self._lock:
            self._num_unfinished -= 1
            state.stream.num_samples_left -= 1
            if state.stream.num_samples_left == 0:
                self._num_unfinished_requests -= 1
        if self.metrics is None:
            return
        now = self.clock()
        queue = seq.first_scheduled_time - state.arrival_time if seq.first_scheduled_time is not None else None
        ttft = state.first_token_time - state.arrival_time if state.first_token_time is not None else None
        self.metrics.observe_request_finished(reason, seq.num_prompt_tokens, seq.num_generated_tokens, queue, ttft,
                                              now - state.arrival_time)

    def _report_step(self, num_tokens: int, expert_counts: list[list[int]] | None = None) -> None:
        self._num_running_requests = len({s.request_id for s in self.scheduler.running})
        if self.metrics is None:
            return
        sched = self.scheduler
        self.metrics.observe_step(num_tokens, self.num_requests_running, self.num_requests_waiting,
                                  sched.block_usage, expert_counts)
        self.metrics.add_preemptions(sched.num_preemptions - self._last_preemptions)
        self._last_preemptions = sched.num_preemptions
        prefix = (sched.num_prefix_queries_tokens, sched.num_prefix_hit_tokens)
        self.metrics.add_prefix_cache(prefix[0] - self._last_prefix[0], prefix[1] - self._last_prefix[1])
        self._last_prefix = prefix

    def _fail_all(self, reason: str) -> None:
        """End every request still queued or running (on shutdown or when the thread dies)."""
        with self._lock:
            self._closed = True
            inbox, self._inbox = self._inbox, []
        leftovers = list(self.scheduler.waiting) + list(self.scheduler.running) + inbox
        for seq in leftovers:
            if seq.status is SequenceStatus.RUNNING:
                try:
                    self.scheduler.finish(seq)
                except Exception:  # the scheduler may be what broke; the stream must still end
                    logger.exception("could not free %s", seq)
            seq.status = SequenceStatus.FINISHED
            self._finished(seq, reason)
        self.scheduler.waiting.clear()
