"""vLLM-named aliases of this server's metrics, so routers, autoscalers and dashboards built for vLLM read us.

Each alias is the customllm_* family of the same meaning, renamed on scrape: the values are the same objects,
never a second recording. The names, types and units are those of vLLM's v1 engine, which the consumers read:
- vllm-router, llm-d / Gateway API Inference Extension's endpoint picker: `vllm:num_requests_waiting`,
  `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (0..1) and `vllm:cache_config_info`'s `block_size`
  and `num_gpu_blocks` labels (the picker sizes its prefix index with them);
- KEDA / prometheus-adapter rules of production-stack and llm-d: `vllm:num_requests_waiting`;
- vLLM's speculative decoding counters (`vllm:spec_decode_*`, the per-position one labelled `position`), read by
  its Grafana dashboard;
- production-stack's router scrapes the v0 names `vllm:gpu_cache_usage_perc` and
  `vllm:gpu_prefix_cache_{queries,hits}_total`, so those are exported too (same values as the v1 names).
Every alias carries vLLM's `model_name` and `engine` labels (engine "0": one engine per server).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class Alias:
    """`vllm_name` is exported with the samples of the family `source` (label names renamed by `labels`)."""

    source: str
    vllm_name: str
    labels: tuple[tuple[str, str], ...] = ()


ALIASES = (
    Alias("customllm_num_requests_running", "vllm:num_requests_running"),
    Alias("customllm_num_requests_waiting", "vllm:num_requests_waiting"),
    Alias("customllm_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc"),
    Alias("customllm_kv_cache_usage_ratio", "vllm:gpu_cache_usage_perc"),
    Alias("customllm_prefix_cache_queries", "vllm:prefix_cache_queries"),
    Alias("customllm_prefix_cache_hits", "vllm:prefix_cache_hits"),
    Alias("customllm_prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    Alias("customllm_prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    Alias("customllm_prompt_tokens", "vllm:prompt_tokens"),
    Alias("customllm_generation_tokens", "vllm:generation_tokens"),
    Alias("customllm_request_success", "vllm:request_success", (("finish_reason", "finished_reason"),)),
    Alias("customllm_num_preemptions", "vllm:num_preemptions"),
    Alias("customllm_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    Alias("customllm_inter_token_latency_seconds", "vllm:inter_token_latency_seconds"),
    Alias("customllm_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
    Alias("customllm_request_queue_time_seconds", "vllm:request_queue_time_seconds"),
    Alias("customllm_spec_decode_num_drafts", "vllm:spec_decode_num_drafts"),
    Alias("customllm_spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens"),
    Alias("customllm_spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens"),
    Alias("customllm_spec_decode_num_accepted_tokens_per_pos", "vllm:spec_decode_num_accepted_tokens_per_pos"),
)


class VllmAliasCollector(Collector):
    """Renames the samples of `sources` (the collectors that own the customllm_* families) on every scrape."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self._sources = list(sources)
        self._lock = threading.Lock()
        self._model_name = ""
        self._cache_labels: dict[str, str] | None = None

    def set_model_name(self, name: str) -> None:
        with self._lock:
            self._model_name = name

    def set_cache_config(self, block_size: int, num_blocks: int, enable_prefix_caching: bool,
                         cache_dtype: str) -> None:
        # Label values as vLLM writes them: str() of the CacheConfig field ("True", "16").
        with self._lock:
            self._cache_labels = {"block_size": str(block_size), "num_gpu_blocks": str(num_blocks),
                                  "enable_prefix_caching": str(enable_prefix_caching), "cache_dtype": cache_dtype}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            common = {"model_name": self._model_name, "engine": "0"}
            cache_labels = self._cache_labels
        families = {f.name: f for source in self._sources for f in source.collect()}
        for alias in ALIASES:
            family = families.get(alias.source)
            if family is None:
                continue
            renamed = dict(alias.labels)
            metric = Metric(alias.vllm_name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {renamed.get(k, k): v for k, v in sample.labels.items()} | common
                metric.samples.append(sample._replace(name=alias.vllm_name + sample.name[len(family.name):],
                                                      labels=labels))
            yield metric
        if cache_labels is not None:
            info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache configuration.",
                                     labels=(*cache_labels, "engine"))
            info.add_metric((*cache_labels.values(), "0"), 1.0)
            yield info
