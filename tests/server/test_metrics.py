"""ServerMetrics: what each recording call does to the exported text."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import FINISH_REASONS, ServerMetrics
from tests.server.metrics_utils import finished_stats, step_stats


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_fresh_instance_exports_zeroes_for_every_finish_reason() -> None:
    samples = _samples(ServerMetrics())
    for reason in FINISH_REASONS:
        assert _value(samples, "customllm_request_success_total", finish_reason=reason) == 0
    assert _value(samples, "customllm_generation_tokens_total") == 0
    assert _value(samples, "customllm_time_to_first_token_seconds_count") == 0


def test_observe_step_sets_gauges_and_accumulates_expert_counts() -> None:
    m = ServerMetrics()
    m.record_step(step_stats(num_tokens=40, num_running=3, num_waiting=2, kv_usage=0.25,
                   expert_counts=[[1, 0, 5], [2, 2, 2]]))
    m.record_step(step_stats(num_tokens=3, num_running=3, num_waiting=0, kv_usage=1.7,
                   expert_counts=[[0, 4, 1], [0, 0, 1]]))
    m.record_step(step_stats(num_tokens=0, num_running=0, num_waiting=0, kv_usage=0.5, expert_counts=None))
    s = _samples(m)
    assert _value(s, "customllm_num_requests_running") == 0
    assert _value(s, "customllm_num_requests_waiting") == 0
    assert _value(s, "customllm_kv_cache_usage_ratio") == 0.5
    # Empty steps are not observed: only the two real steps, 40 + 3 tokens.
    assert _value(s, "customllm_tokens_per_step_count") == 2
    assert _value(s, "customllm_tokens_per_step_sum") == 43
    assert _value(s, "customllm_tokens_per_step_bucket", le="4.0") == 1
    expected = {(0, 0): 1, (0, 1): 4, (0, 2): 6, (1, 0): 2, (1, 1): 2, (1, 2): 3}
    for (layer, expert), total in expected.items():
        assert _value(s, "customllm_moe_expert_tokens_total", layer=str(layer), expert=str(expert)) == total


def test_kv_usage_is_clamped_to_unit_interval() -> None:
    m = ServerMetrics()
    m.record_step(step_stats(1, 1, 0, 1.7))
    assert _value(_samples(m), "customllm_kv_cache_usage_ratio") == 1.0
    m.record_step(step_stats(1, 1, 0, -0.1))
    assert _value(_samples(m), "customllm_kv_cache_usage_ratio") == 0.0


def test_expert_counts_of_growing_shape_are_added_not_lost() -> None:
    m = ServerMetrics()
    m.record_step(step_stats(1, 1, 0, 0.0, [[1]]))
    m.record_step(step_stats(1, 1, 0, 0.0, [[1, 2], [3, 4]]))
    m.record_step(step_stats(1, 1, 0, 0.0, [[1]]))
    s = _samples(m)
    assert _value(s, "customllm_moe_expert_tokens_total", layer="0", expert="0") == 3
    assert _value(s, "customllm_moe_expert_tokens_total", layer="0", expert="1") == 2
    assert _value(s, "customllm_moe_expert_tokens_total", layer="1", expert="1") == 4


def test_request_finished_counts_tokens_and_latencies() -> None:
    m = ServerMetrics()
    m.record_finished(finished_stats("stop", prompt_tokens=7, generation_tokens=11, queue_time=0.002, ttft=0.04,
                               e2e=1.5))
    m.record_finished(finished_stats("length", 3, 16, queue_time=0.5, ttft=0.6, e2e=2.0))
    m.record_finished(finished_stats("abort", 5, 0, queue_time=None, ttft=None, e2e=0.3))
    s = _samples(m)
    assert _value(s, "customllm_prompt_tokens_total") == 15
    assert _value(s, "customllm_generation_tokens_total") == 27
    assert _value(s, "customllm_request_success_total", finish_reason="stop") == 1
    assert _value(s, "customllm_request_success_total", finish_reason="length") == 1
    assert _value(s, "customllm_request_success_total", finish_reason="abort") == 1
    assert _value(s, "customllm_request_success_total", finish_reason="error") == 0
    # The aborted request never reached the queue's end or a first token: not observed there.
    assert _value(s, "customllm_time_to_first_token_seconds_count") == 2
    assert _value(s, "customllm_time_to_first_token_seconds_sum") == pytest.approx(0.64)
    assert _value(s, "customllm_time_to_first_token_seconds_bucket", le="0.05") == 1
    assert _value(s, "customllm_request_queue_time_seconds_count") == 2
    assert _value(s, "customllm_e2e_request_latency_seconds_count") == 3
    assert _value(s, "customllm_e2e_request_latency_seconds_sum") == pytest.approx(3.8)


def test_unknown_finish_reason_is_rejected() -> None:
    with pytest.raises(ValueError, match="finish_reason"):
        ServerMetrics().record_finished(finished_stats("eos", 1, 1, 0.0, 0.0, 0.0))


def test_token_latency_preemptions_prefix_cache_and_http() -> None:
    m = ServerMetrics()
    for gap in (0.01, 0.02, 0.03):
        m.observe_token_latency(gap)
    m.record_step(step_stats(preemptions=2))
    m.record_step(step_stats(preemptions=0))
    m.record_step(step_stats(prefix_queries=64, prefix_hits=48))
    m.record_step(step_stats(prefix_queries=16, prefix_hits=0))
    m.observe_http("/v1/completions", 200)
    m.observe_http("/v1/completions", 200)
    m.observe_http("/v1/completions", 400)
    s = _samples(m)
    assert _value(s, "customllm_inter_token_latency_seconds_count") == 3
    assert _value(s, "customllm_inter_token_latency_seconds_sum") == pytest.approx(0.06)
    assert _value(s, "customllm_num_preemptions_total") == 2
    assert _value(s, "customllm_prefix_cache_queries_total") == 80
    assert _value(s, "customllm_prefix_cache_hits_total") == 48
    assert _value(s, "customllm_http_requests_total", route="/v1/completions", status="200") == 2
    assert _value(s, "customllm_http_requests_total", route="/v1/completions", status="400") == 1


def test_info_and_kv_cache_info() -> None:
    m = ServerMetrics()
    m.set_info(model="customllm", dtype="float32", device="cpu", version="1.2.3")
    m.set_info(model="customllm", dtype="bfloat16", device="cuda", version="1.2.3")
    m.set_kv_cache_info(bytes_per_token=69120, capacity_tokens=4096)
    s = _samples(m)
    info = [k for k in s if k[0] == "customllm_info"]
    # Re-setting replaces the labels rather than adding a second series.
    assert info == [("customllm_info", (("device", "cuda"), ("dtype", "bfloat16"), ("model", "customllm"),
                                         ("version", "1.2.3")))]
    assert s[info[0]] == 1
    assert _value(s, "customllm_kv_cache_bytes_per_token") == 69120
    assert _value(s, "customllm_kv_cache_capacity_tokens") == 4096


def test_two_instances_do_not_share_state() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.record_finished(finished_stats("stop", 1, 5, 0.0, 0.1, 0.2))
    a.record_step(step_stats(5, 1, 0, 0.1, [[5]]))
    sa, sb = _samples(a), _samples(b)
    assert _value(sa, "customllm_generation_tokens_total") == 5
    assert _value(sb, "customllm_generation_tokens_total") == 0
    assert ("customllm_moe_expert_tokens_total", (("expert", "0"), ("layer", "0"))) not in sb
