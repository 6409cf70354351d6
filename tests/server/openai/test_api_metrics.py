"""/metrics over real HTTP: every metric present, and a request moves the counters, histograms, prefix-cache and
expert-token metrics by exactly what it did."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.tokenizer import Tokenizer
from tests.server.live import LiveServer
from tests.server.openai.ops_helpers import idle, wait_for

NUM_LAYERS, NUM_ROUTED_EXPERTS, TOP_K = 2, 3, 2  # tests/server/live.py's TINY_SERVE
Sample = tuple[str, frozenset[tuple[str, str]]]


def samples(server: LiveServer) -> dict[Sample, float]:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(snapshot: dict[Sample, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in snapshot.items() if n == name and set(labels.items()) <= ls)


def expert_tokens_per_layer(snapshot: dict[Sample, float]) -> list[float]:
    return [value(snapshot, "customllm_moe_expert_tokens_total", layer=str(layer)) for layer in range(NUM_LAYERS)]


def expert_delta(after: dict[Sample, float], before: dict[Sample, float]) -> list[float]:
    return [a - b for a, b in zip(expert_tokens_per_layer(after), expert_tokens_per_layer(before), strict=True)]


REQUIRED_SAMPLES = [
    "customllm_num_requests_running", "customllm_num_requests_waiting", "customllm_kv_cache_usage_ratio",
    "customllm_prompt_tokens_total", "customllm_generation_tokens_total", "customllm_request_success_total",
    "customllm_num_preemptions_total", "customllm_prefix_cache_queries_total", "customllm_prefix_cache_hits_total",
    "customllm_moe_expert_tokens_total", "customllm_http_requests_total",
] + [f"customllm_{h}_{suffix}" for h in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                                         "e2e_request_latency_seconds", "request_queue_time_seconds",
                                         "tokens_per_step") for suffix in ("bucket", "count", "sum")]


def test_metrics_parse_and_every_metric_is_present(server: LiveServer, http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 3})
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    names = {s.name for f in families for s in f.samples}
    missing = [n for n in REQUIRED_SAMPLES if n not in names]
    assert not missing, missing
    # Our own names, and vLLM's names of the same values (server/vllm/metrics_aliases.py) for routers and autoscalers.
    assert all(f.name.startswith(("customllm_", "vllm:")) for f in families), [f.name for f in families]
    snapshot = samples(server)
    for reason in ("stop", "length", "abort", "error"):
        assert ("customllm_request_success_total", frozenset({("finish_reason", reason)})) in snapshot
    experts = {tuple(sorted(ls)) for (n, ls) in snapshot if n == "customllm_moe_expert_tokens_total"}
    assert experts == {(("expert", str(e)), ("layer", str(la)))
                       for la in range(NUM_LAYERS) for e in range(NUM_ROUTED_EXPERTS)}
    assert ("customllm_http_requests_total",
            frozenset({("route", "/v1/completions"), ("status", "200")})) in snapshot


def _request_and_deltas(server: LiveServer, http: httpx.Client, body: dict[str, Any], processed: Callable[
        [dict[str, Any], float], int]) -> tuple[dict[str, Any], dict[Sample, float], dict[Sample, float]]:
    """Run a request; wait until /metrics has recorded all of it (the engine reports a step after handing out its
    tokens, and the HTTP counter moves after the body is sent); return (response, before, after)."""
    wait_for(lambda: idle(server), what="idle before the request")
    before = samples(server)
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    resp = response.json()

    def recorded() -> bool:
        after = samples(server)
        hits = value(after, "customllm_prefix_cache_hits_total") - value(before, "customllm_prefix_cache_hits_total")
        want = processed(resp["usage"], hits) * TOP_K
        done = expert_delta(after, before)
        http_seen = value(after, "customllm_http_requests_total", route="/v1/completions", status="200") > value(
            before, "customllm_http_requests_total", route="/v1/completions", status="200")
        return http_seen and all(d >= want for d in done)

    wait_for(recorded, what="the request's metrics")
    return resp, before, samples(server)


def test_metrics_move_by_the_request(server: LiveServer, http: httpx.Client, tok: Tokenizer) -> None:
    prompt = "Metrics count exactly"
    body = {"prompt": prompt, "max_tokens": 7, "ignore_eos": True, "temperature": 0}

    def processed(usage: dict[str, Any], hits: float) -> int:
        return usage["prompt_tokens"] + usage["completion_tokens"] - 1 - int(hits)  # the last token is not fed

    resp, before, after = _request_and_deltas(server, http, body, processed)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    usage = resp["usage"]
    assert usage == {"prompt_tokens": len(tok.encode(prompt)), "completion_tokens": 7,
                     "total_tokens": len(tok.encode(prompt)) + 7}
    assert delta("customllm_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("customllm_generation_tokens_total") == usage["completion_tokens"]
    assert delta("customllm_request_success_total", finish_reason="length") == 1
    assert delta("customllm_request_success_total") == 1
    assert delta("customllm_prefix_cache_queries_total") == usage["prompt_tokens"]
    assert delta("customllm_prefix_cache_hits_total") == 0  # shorter than one block: nothing to share
    want = processed(usage, 0) * TOP_K
    assert expert_delta(after, before) == [want] * NUM_LAYERS
    assert delta("customllm_tokens_per_step_count") == 7  # one prefill step, then one step per further token
    assert delta("customllm_tokens_per_step_sum") == processed(usage, 0)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"customllm_{histogram}_count") == 1, histogram
    assert delta("customllm_inter_token_latency_seconds_count") == 6
    assert delta("customllm_e2e_request_latency_seconds_sum") >= delta("customllm_time_to_first_token_seconds_sum")
    assert delta("customllm_http_requests_total", route="/v1/completions", status="200") == 1
    assert delta("customllm_num_preemptions_total") == 0
    assert value(after, "customllm_num_requests_running") == 0


def test_prefix_cache_metrics_and_skipped_compute(server: LiveServer, http: httpx.Client) -> None:
    ids = list(range(2000, 2040))  # 40 tokens: two full blocks of 16 can be shared
    body = {"prompt": ids, "max_tokens": 4, "ignore_eos": True, "temperature": 0}

    def processed(usage: dict[str, Any], hits: float) -> int:
        return usage["prompt_tokens"] + usage["completion_tokens"] - 1 - int(hits)

    first, before1, after1 = _request_and_deltas(server, http, body, processed)
    second, before2, after2 = _request_and_deltas(server, http, body, processed)
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert value(after1, "customllm_prefix_cache_hits_total") == value(before1, "customllm_prefix_cache_hits_total")
    hits = value(after2, "customllm_prefix_cache_hits_total") - value(before2, "customllm_prefix_cache_hits_total")
    queries = value(after2, "customllm_prefix_cache_queries_total") - value(before2,
                                                                            "customllm_prefix_cache_queries_total")
    assert queries == 40 and hits % 16 == 0 and 16 <= hits < 40, (queries, hits)
    # Cached prompt tokens are not recomputed: the experts saw only the rest.
    done = expert_delta(after2, before2)
    assert done == [processed(second["usage"], hits) * TOP_K] * NUM_LAYERS
