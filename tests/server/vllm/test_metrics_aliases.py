"""The vllm:* aliases: the same values as the customllm_* families they rename, under vLLM's names and types."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics
from server.vllm.metrics_aliases import ALIASES
from tests.server.metrics_utils import finished_stats, step_stats


def _families(metrics: ServerMetrics) -> dict:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _record_some(m: ServerMetrics) -> None:
    m.record_step(step_stats(num_tokens=12, num_running=3, num_waiting=5, kv_usage=0.375, preemptions=2,
                             prefix_queries=64, prefix_hits=48))
    m.record_finished(finished_stats("stop", 10, 4, 0.01, 0.2, 1.5))
    m.record_finished(finished_stats("length", 7, 16, None, None, 0.3))
    m.observe_token_latency(0.04)


def test_every_alias_has_the_values_and_type_of_its_source() -> None:
    m = ServerMetrics()
    m.set_served_model_name("served-x")
    _record_some(m)
    families = _families(m)
    for alias in ALIASES:
        src, dst = families[alias.source], families[alias.vllm_name]
        assert dst.type == src.type, alias
        renamed = dict(alias.labels)
        expected = {(s.name.replace(alias.source, alias.vllm_name, 1),
                     tuple(sorted(({renamed.get(k, k): v for k, v in s.labels.items()}
                                   | {"model_name": "served-x", "engine": "0"}).items()))): s.value
                    for s in src.samples}
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in dst.samples}
        assert got == expected, alias


def test_the_names_routers_and_autoscalers_read() -> None:
    m = ServerMetrics()
    _record_some(m)
    samples = {s.name: s for f in _families(m).values() for s in f.samples
               if not s.labels.get("le") and s.name.startswith("vllm:")}
    assert samples["vllm:num_requests_waiting"].value == 5
    assert samples["vllm:num_requests_running"].value == 3
    assert samples["vllm:kv_cache_usage_perc"].value == 0.375
    assert samples["vllm:gpu_cache_usage_perc"].value == 0.375
    assert samples["vllm:prefix_cache_queries_total"].value == 64
    assert samples["vllm:prefix_cache_hits_total"].value == 48
    assert samples["vllm:gpu_prefix_cache_hits_total"].value == 48
    assert samples["vllm:time_to_first_token_seconds_count"].value == 1
    assert samples["vllm:e2e_request_latency_seconds_count"].value == 2
    assert samples["vllm:inter_token_latency_seconds_sum"].value == 0.04
    assert samples["vllm:num_preemptions_total"].value == 2


def test_cache_config_info_carries_block_size_and_block_count() -> None:
    m = ServerMetrics()
    assert "vllm:cache_config_info" not in _families(m)  # nothing to say before the cache exists
    m.set_cache_config(block_size=16, num_blocks=256, enable_prefix_caching=True, cache_dtype="bfloat16")
    (sample,) = _families(m)["vllm:cache_config_info"].samples
    assert sample.value == 1
    assert sample.labels == {"block_size": "16", "num_gpu_blocks": "256", "enable_prefix_caching": "True",
                             "cache_dtype": "bfloat16", "engine": "0"}
