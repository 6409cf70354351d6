"""Prometheus metrics of one server: a private registry, cheap recording calls, text rendering.

Every method takes *deltas* for counters (what happened since the last call) and *current values*
for gauges. The engine thread calls `record_step` once per step, so that path does no allocation
beyond a few list operations and never formats labels.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.stats import FinishedStats, SchedulerStats
from server.vllm.metrics_aliases import VllmAliasCollector

FINISH_REASONS = ("stop", "length", "abort", "error")

# Bucket edges in seconds. TTFT spans a cached short prompt on a GPU (ms) to a long CPU prefill
# behind a queue (tens of s); ITL is one decode step, which on a CPU can reach a second.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.0, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Tokens in one engine step: 1 (a lone decode) up to a large prefill budget.
_STEP_TOKEN_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 .. 16384


def _package_version() -> str:
    try:
        return metadata.version("customllm-server")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _ExpertLoadCollector(Collector):
    """customllm_moe_expert_tokens_total{layer,expert}, kept as plain int lists.

    2-D label sets would cost one locked `inc()` per (layer, expert) per step through the regular
    Counter; here a step is one C-level `map(add)` per layer and labels are built only on scrape.
    """

    def __init__(self) -> None:
        self._totals: list[list[int]] = []
        self._lock = threading.Lock()

    def add(self, counts: Sequence[Sequence[int]]) -> None:
        with self._lock:
            totals = self._totals
            for layer, row in enumerate(counts):
                if layer >= len(totals):
                    totals.append([0] * len(row))
                current = totals[layer]
                if len(current) < len(row):
                    current.extend([0] * (len(row) - len(current)))
                totals[layer] = list(map(operator.add, current, row)) + current[len(row):]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "customllm_moe_expert_tokens",
            "Tokens routed to each routed expert of each MoE layer (layer = decoder layer index).",
            labels=("layer", "expert"),
        )
        with self._lock:
            snapshot = [list(row) for row in self._totals]
        for layer, row in enumerate(snapshot):
            for expert, total in enumerate(row):
                family.add_metric((str(layer), str(expert)), float(total))
        yield family


class ServerMetrics:
    """All metrics of one server instance, in a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self.info = Gauge("customllm_info", "Constant 1, labelled with what this server serves.",
                          ("model", "dtype", "device", "version"), registry=r)
        self.num_requests_running = Gauge(
            "customllm_num_requests_running", "Requests in the running batch.", registry=r)
        self.num_requests_waiting = Gauge(
            "customllm_num_requests_waiting", "Requests admitted to the queue, not yet running.", registry=r)
        self.kv_cache_usage_ratio = Gauge(
            "customllm_kv_cache_usage_ratio", "Fraction of KV cache blocks in use, 0..1.", registry=r)
        self.kv_cache_bytes_per_token = Gauge(
            "customllm_kv_cache_bytes_per_token", "Bytes of KV cache one token takes over all layers.",
            registry=r)
        self.kv_cache_capacity_tokens = Gauge(
            "customllm_kv_cache_capacity_tokens", "Tokens the KV cache can hold.", registry=r)

        self.prompt_tokens = Counter(
            "customllm_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            "customllm_generation_tokens", "Generated tokens of finished requests.", registry=r)
        self.request_success = Counter(
            "customllm_request_success", "Finished requests by finish reason.", ("finish_reason",),
            registry=r)
        # Children created up front so every reason is exported as 0 before it first happens.
        self._finish_children = {reason: self.request_success.labels(reason) for reason in FINISH_REASONS}
        self.num_preemptions = Counter(
            "customllm_num_preemptions", "Requests preempted (their KV cache freed) to make room.",
            registry=r)
        self.prefix_cache_queries = Counter(
            "customllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter(
            "customllm_prefix_cache_hits", "Prompt tokens found in the prefix cache.", registry=r)
        self.spec_decode_num_drafts = Counter(
            "customllm_spec_decode_num_drafts", "Speculative drafts verified (one per sequence and step with drafts).",
            registry=r)
        self.spec_decode_num_draft_tokens = Counter(
            "customllm_spec_decode_num_draft_tokens", "Speculative draft tokens verified.", registry=r)
        self.spec_decode_num_accepted_tokens = Counter(
            "customllm_spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.", registry=r)
        self.spec_decode_num_accepted_tokens_per_pos = Counter(
            "customllm_spec_decode_num_accepted_tokens_per_pos",
            "Speculative draft tokens accepted at each position of a draft (0 = the first drafted token).",
            ("position",), registry=r)
        self.http_requests = Counter(
            "customllm_http_requests", "HTTP responses by route template and status code.",
            ("route", "status"), registry=r)

        self.time_to_first_token = Histogram(
            "customllm_time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "customllm_inter_token_latency_seconds", "Time between consecutive tokens of one request.",
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "customllm_e2e_request_latency_seconds", "Arrival to finish of a request.",
            buckets=_E2E_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "customllm_request_queue_time_seconds", "Arrival to first scheduling of a request.",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.tokens_per_step = Histogram(
            "customllm_tokens_per_step", "Tokens (prefill and decode) in one engine step.",
            buckets=_STEP_TOKEN_BUCKETS, registry=r)

        self._expert_load = _ExpertLoadCollector()
        r.register(self._expert_load)
        # vllm:* names of the same values, for routers and autoscalers that speak vLLM's metrics.
        self.vllm_aliases = VllmAliasCollector(
            (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_ratio, self.prompt_tokens,
             self.generation_tokens, self.request_success, self.num_preemptions, self.prefix_cache_queries,
             self.prefix_cache_hits, self.time_to_first_token, self.inter_token_latency, self.e2e_request_latency,
             self.request_queue_time, self.spec_decode_num_drafts, self.spec_decode_num_draft_tokens,
             self.spec_decode_num_accepted_tokens, self.spec_decode_num_accepted_tokens_per_pos))
        r.register(self.vllm_aliases)
        self._info_labels: tuple[str, str, str, str] | None = None

    # --- set once at start-up -------------------------------------------------------------------

    def set_info(self, model: str, dtype: str, device: str, version: str | None = None) -> None:
        """Set customllm_info's labels (replacing earlier ones); version defaults to the package's."""
        labels = (model, dtype, device, version if version is not None else _package_version())
        if self._info_labels is not None:
            self.info.remove(*self._info_labels)
        self.info.labels(*labels).set(1)
        self._info_labels = labels

    def set_kv_cache_info(self, bytes_per_token: int, capacity_tokens: int) -> None:
        self.kv_cache_bytes_per_token.set(bytes_per_token)
        self.kv_cache_capacity_tokens.set(capacity_tokens)

    def set_cache_config(self, block_size: int, num_blocks: int, enable_prefix_caching: bool,
                         cache_dtype: str) -> None:
        """vllm:cache_config_info's labels (a router sizes its prefix index by block_size)."""
        self.vllm_aliases.set_cache_config(block_size, num_blocks, enable_prefix_caching, cache_dtype)

    def set_num_speculative_tokens(self, num_tokens: int) -> None:
        """Export the per-position accepted-token counters of every draft position (as 0 until counted)."""
        for position in range(num_tokens):
            self.spec_decode_num_accepted_tokens_per_pos.labels(str(position))

    def set_served_model_name(self, name: str) -> None:
        """The model_name label of the vllm:* aliases."""
        self.vllm_aliases.set_model_name(name)

    # --- engine thread --------------------------------------------------------------------------

    def record_step(self, stats: SchedulerStats) -> None:
        """Record one engine step (or an idle poll: no tokens)."""
        if stats.num_batched_tokens > 0:
            self.tokens_per_step.observe(stats.num_batched_tokens)
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage_ratio.set(min(max(stats.kv_cache_usage, 0.0), 1.0))
        if stats.expert_counts is not None:
            self._expert_load.add(stats.expert_counts)
        if stats.num_new_preemptions:
            self.num_preemptions.inc(stats.num_new_preemptions)
        if stats.num_new_prefix_queries:
            self.prefix_cache_queries.inc(stats.num_new_prefix_queries)
        if stats.num_new_prefix_hits:
            self.prefix_cache_hits.inc(stats.num_new_prefix_hits)
        spec = stats.spec_decoding
        if spec is not None:
            self.spec_decode_num_drafts.inc(spec.num_drafts)
            self.spec_decode_num_draft_tokens.inc(spec.num_draft_tokens)
            self.spec_decode_num_accepted_tokens.inc(spec.num_accepted_tokens)
            for position, count in enumerate(spec.num_accepted_tokens_per_pos):
                if count:
                    self.spec_decode_num_accepted_tokens_per_pos.labels(str(position)).inc(count)

    def record_finished(self, stats: FinishedStats) -> None:
        """Record a finished sample."""
        child = self._finish_children.get(stats.finish_reason)
        if child is None:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {stats.finish_reason!r}")
        child.inc()
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.queue_time is not None:
            self.request_queue_time.observe(stats.queue_time)
        if stats.time_to_first_token is not None:
            self.time_to_first_token.observe(stats.time_to_first_token)
        self.e2e_request_latency.observe(stats.e2e_latency)

    def observe_token_latency(self, seconds: float) -> None:
        """Record the gap between two consecutive tokens of one request."""
        self.inter_token_latency.observe(seconds)

    # --- HTTP side ------------------------------------------------------------------------------

    def observe_http(self, route: str, status: int) -> None:
        """Count one response. Pass the route *template* (or a fixed "other"), never a raw URL path."""
        self.http_requests.labels(route, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
