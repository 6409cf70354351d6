"""The engine core: owns the model runner and the scheduler, and runs steps on one background thread.

Threading: the engine thread is the only one that touches the scheduler, the model and tensors. Other threads
talk to it through `_inbox` (new requests, aborts) under a lock; results go back through each request's
`RequestStream` (server/engine/outputs.py), which the engine appends to without ever waiting for the consumer.
Stop checks live where the scheduler updates sequences after a step (`Scheduler.update_from_output`), and what
metrics records comes as stats objects (server/engine/stats.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable

from server.engine.grammar import CompiledGrammar
from server.engine.model_runner import ModelRunner
from server.engine.ngram_drafter import NgramDrafter
from server.engine.outputs import RequestStream, SequenceOutput
from server.engine.routed_experts import RoutedExpertsRecord, record_step
from server.engine.sampler_state import PromptLogprob, SamplingState
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, SequenceUpdate
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.speculative_config import SpeculativeConfig
from server.engine.stats import FinishedStats
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


class Engine:
    """Continuous-batching engine. `add_request` and `abort` are safe from any thread."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig, vocab_size: int,
                 metrics: ServerMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 speculative_config: SpeculativeConfig | None = None) -> None:
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
        # Speculative decoding: drafts proposed for the running decodes before each step is scheduled.
        self.drafter = (None if speculative_config is None
                        else NgramDrafter(speculative_config, config.max_model_len))
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
        self._streams: dict[int, RequestStream] = {}  # seq_id -> its request's stream, while unfinished

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

    @property
    def enable_return_routed_experts(self) -> bool:
        """Whether requests may ask for their routed experts (--enable-return-routed-experts)."""
        return self.runner.enable_return_routed_experts

    # -- requests (any thread) -----------------------------------------------------------------

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the problem, for a request this engine cannot serve."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        params.validate_token_ids(self.vocab_size)
        if params.return_routed_experts and not self.enable_return_routed_experts:
            raise ValueError("return_routed_experts needs the server started with --enable-return-routed-experts")
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
            seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, child.max_tokens, now, sampling, index)
            # Cached blocks carry no routing: a sequence that asks computes its prompt (see RoutedExpertsRecord).
            seq.skip_reading_prefix_cache = child.prompt_logprobs is not None or child.return_routed_experts
            seq.routed_experts = RoutedExpertsRecord() if child.return_routed_experts else None
            seqs.append(seq)
        with self._lock:
            # Checked again under the lock: the thread may have died since the check above, after which
            # nothing would ever take this request from the inbox.
            if self._closed:
                raise EngineDeadError(self.dead_reason or "engine is not running")
            self._inbox.extend(seqs)
            self._streams.update((seq.seq_id, stream) for seq in seqs)
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
            for seq in self.scheduler.abort(request_id, index):
                self._emit(SequenceUpdate(seq, None, reason))

    def step(self) -> None:
        """Schedule one batch, run it, hand out its tokens."""
        if self.drafter is not None:
            self.drafter.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        self._num_running_requests = len({s.request_id for s in self.scheduler.running})
        if out.is_empty:
            self._wakeup.wait(timeout=0.01)  # nothing fits right now (e.g. after preempting everything)
            return
        try:
            step = self.runner.execute(out.scheduled)
            record_step(out.scheduled, step.routed_experts)
        except Exception:
            # Only the requests in this step fail; the engine keeps serving the others.
            logger.exception("model step failed; failing its %d sequences", len(out.scheduled))
            for s in out.scheduled:
                if s.seq.status is SequenceStatus.RUNNING:
                    self.scheduler.finish(s.seq)
                    self._emit(SequenceUpdate(s.seq, None, "error"))
            return
        updates = self.scheduler.update_from_output(out, step.sampled, self.eos_token_id)
        self.num_steps += 1
        now = self.clock()
        for update in updates:
            self._emit(update, now)
        self._report_step(out.num_batched_tokens, step.expert_counts)

    def _emit(self, update: SequenceUpdate, now: float | None = None) -> None:
        """Hand one sequence's step result to its request's stream; count it finished if it ended."""
        seq, item = update.seq, update.sampled
        stream = self._streams[seq.seq_id]
        lp: list[float] | None = [] if seq.params.logprobs is not None else None
        output = SequenceOutput(seq.index, [], lp, [] if lp is not None else None, update.finish_reason)
        if item is not None:
            assert now is not None, "a sampled token needs the step's time"
            if seq.num_generated_tokens == len(item.token_ids) and seq.num_preemptions == 0:
                stream.num_cached_tokens = seq.num_cached_tokens
            if seq.first_token_time is None:
                seq.first_token_time = now
            elif self.metrics is not None and seq.last_token_time is not None:
                self.metrics.observe_token_latency(now - seq.last_token_time)
            seq.last_token_time = now
            output.token_ids = item.token_ids
            output.logprobs = item.logprobs
            output.top_logprobs = item.top_logprobs
        # With the first token (or the end of a prompt-only sequence): the prompt logprobs, once.
        prompt_only_done = item is None and update.finish_reason == "length" and seq.max_tokens == 0
        if (item is not None and seq.num_generated_tokens == len(item.token_ids)) or prompt_only_done:
            output.prompt_logprobs = self._take_prompt_logprobs(seq)
        # With each token: the rows of the tokens read to produce it (the whole prompt's with the first).
        if seq.routed_experts is not None and (item is not None or prompt_only_done):
            output.routed_experts = seq.routed_experts.take()
        if update.finish_reason is not None:
            self._count_finished(seq, update.finish_reason, stream)
        stream.put(output)

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list[PromptLogprob | None] | None:
        """The prompt logprobs, once, when the prompt is computed; the prefix cache is read again afterwards (also by
        a sequence recording its routed experts: a hit ends before its last token, and every position before it
        has its row by now)."""
        entries, seq.sampling.prompt_logprobs = seq.sampling.prompt_logprobs, None
        seq.skip_reading_prefix_cache = False
        return entries

    def _count_finished(self, seq: Sequence, reason: str, stream: RequestStream) -> None:
        with self._lock:
            del self._streams[seq.seq_id]
            self._num_unfinished -= 1
            stream.num_samples_left -= 1
            if stream.num_samples_left == 0:
                self._num_unfinished_requests -= 1
        if self.metrics is None:
            return
        start = seq.arrival_time
        self.metrics.record_finished(FinishedStats(
            reason, seq.num_prompt_tokens, seq.num_generated_tokens,
            None if seq.first_scheduled_time is None else seq.first_scheduled_time - start,
            None if seq.first_token_time is None else seq.first_token_time - start, self.clock() - start))

    def _report_step(self, num_tokens: int, expert_counts: list[list[int]] | None = None) -> None:
        self._num_running_requests = len({s.request_id for s in self.scheduler.running})
        if self.metrics is not None:
            self.metrics.record_step(self.scheduler.make_stats(num_tokens, self.num_requests_running,
                                                               self.num_requests_waiting, expert_counts))

    def _fail_all(self, reason: str) -> None:
        """End every request still queued or running (on shutdown or when the thread dies)."""
        with self._lock:
            self._closed = True
            inbox, self._inbox = self._inbox, []
        leftovers = [*self.scheduler.waiting, *self.scheduler.running]  # taken first: every stream must end
        try:
            self.scheduler.abort(None)
        except Exception:  # the scheduler may be what broke
            logger.exception("could not free the scheduler's sequences")
        for seq in [*leftovers, *inbox]:
            seq.status = SequenceStatus.FINISHED
            self._emit(SequenceUpdate(seq, None, reason))
