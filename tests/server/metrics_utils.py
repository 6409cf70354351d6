"""Stats objects for the metrics tests, with the engine's defaults for what a test does not set."""

from __future__ import annotations

from server.engine.stats import FinishedStats, SchedulerStats


def step_stats(num_tokens: int = 0, num_running: int = 0, num_waiting: int = 0, kv_usage: float = 0.0,
               expert_counts: list[list[int]] | None = None, *, preemptions: int = 0, prefix_queries: int = 0,
               prefix_hits: int = 0) -> SchedulerStats:
    return SchedulerStats(num_tokens, num_running, num_waiting, kv_usage, preemptions, prefix_queries, prefix_hits,
                          expert_counts)


def finished_stats(finish_reason: str, prompt_tokens: int, generation_tokens: int, queue_time: float | None,
                   ttft: float | None, e2e: float) -> FinishedStats:
    return FinishedStats(finish_reason, prompt_tokens, generation_tokens, queue_time, ttft, e2e)
