"""Helpers of the HTTP operations tests: wait for a condition, and whether a live server is idle."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.server.live import LiveServer


def wait_for(condition: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.02)


def idle(server: LiveServer) -> bool:
    return (server.metric("customllm_num_requests_running") == 0
            and server.metric("customllm_num_requests_waiting") == 0
            and server.metric("customllm_kv_cache_usage_ratio") == 0)
