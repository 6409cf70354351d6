"""Graceful drain on SIGTERM: the listener stays open and answers 503, in-flight requests finish, then exit.

Why not uvicorn's own graceful shutdown: it closes the listening socket first (new connections are refused, which
readiness probes and routers cannot tell from a crash) and, at `timeout_graceful_shutdown`, cancels the request
tasks, which cuts streams mid-body and logs CancelledError tracebacks. Here uvicorn's shutdown only starts once
nothing is in flight any more:

1. SIGTERM: `Drain.begin()`. `/health` and new work answer 503 with `Retry-After` (server/openai/api.py), on new
   connections and kept-alive ones alike.
2. Until `--shutdown-timeout`: in-flight requests run to their end.
3. At the timeout: the engine ends every unfinished request with finish_reason "abort", so each stream still gets
   its final chunk and `data: [DONE]`; the responses have `_ABORT_GRACE_S` to reach their clients.
4. Nothing in flight (or the grace is over): uvicorn's shutdown runs, the lifespan stops the engine, exit 0.
A second SIGINT forces the exit at once (uvicorn's behaviour).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

_ABORT_GRACE_S = 5.0  # after the timeout's aborts, time for the final chunks to reach slow clients


class Drain:
    """The app's drain state: whether it is draining, and how many HTTP requests are in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.draining = False
        self.in_flight = 0  # HTTP requests between their first byte and their last response byte
        self.started_at: float | None = None

    def begin(self) -> None:
        if not self.draining:
            self.draining, self.started_at = True, self.clock()

    @property
    def seconds(self) -> float:
        """How long the drain has run (0 before it begins)."""
        return 0.0 if self.started_at is None else self.clock() - self.started_at


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal starts a drain (see the module docstring) instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain, abort_all: Callable[[], None],
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.abort_all = abort_all
        self.shutdown_timeout = shutdown_timeout
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's shutdown (a second SIGINT forces it)
            return
        self._captured_signals.append(sig)
        self.drain.begin()
        logger.info("draining: %d requests in flight; new work gets 503 for up to %.1f s", self.drain.in_flight,
                    self.shutdown_timeout)

    async def on_tick(self, counter: int) -> bool:
        drain = self.drain
        if drain.draining and not self.should_exit:
            if drain.in_flight == 0:
                logger.info("drained after %.1f s; shutting down", drain.seconds)
                self.should_exit = True
            elif self._aborted_at is None and drain.seconds >= self.shutdown_timeout:
                logger.warning("shutdown timeout (%.1f s): aborting %d in-flight requests", self.shutdown_timeout,
                               drain.in_flight)
                self.abort_all()
                self._aborted_at = drain.clock()
            elif self._aborted_at is not None and drain.clock() - self._aborted_at >= _ABORT_GRACE_S:
                logger.warning("%d responses still unsent %.0f s after the abort; shutting down",
                               drain.in_flight, _ABORT_GRACE_S)
                self.should_exit = True
        return await super().on_tick(counter)
