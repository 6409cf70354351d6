"""The engine's output side: what a step produced, and the per-request streams that hand it to asyncio.

Threading: the engine thread only appends to a stream's buffer and schedules a wake-up; one asyncio consumer per
request takes what has accumulated. A slow consumer never slows a step, and a consumer that falls behind gets
several tokens per output (coalesced), not an ever-longer queue of events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator

import numpy as np

from server.engine.sampler_state import PromptLogprob
from server.engine.sequence import Sequence


@dataclasses.dataclass(slots=True)
class SampledToken:
    """What a step produced for one sequence whose last token it computed: one token, or with speculative decoding
    the drafts it kept and one token of the model's own (each with its logprobs, when asked for)."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


@dataclasses.dataclass(slots=True)
class StepOutput:
    """What the model runner returns for one step."""

    sampled: list[SampledToken]
    expert_counts: list[list[int]]  # the step's tokens per [layer][routed expert]
    # Per scheduled sequence, in order: the routed experts [num_new_tokens, L, K] int32 of the tokens it read this
    # step (server/engine/routed_experts.py), None where it did not ask.
    routed_experts: list[np.ndarray | None]


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
    # If it asked for them: the routed experts of the tokens the model read to produce these tokens, as pieces
    # [t, L, K] int32 in token order (merged outputs append pieces: nothing is copied on the engine thread).
    routed_experts: list[np.ndarray] | None = None


class RequestStream:
    """Outputs of one request (its n samples), handed from the engine thread to one asyncio consumer."""

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
                if out.routed_experts is not None:
                    pending.routed_experts = (pending.routed_experts or []) + out.routed_experts
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
