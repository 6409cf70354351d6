"""Operations over real HTTP: the small endpoints, API key, queue limit, client disconnects, /metrics, and the real
CLI in a subprocess (graceful SIGTERM drain, start-up errors)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.openai.api import ServerSettings
from server.tokenizer import Tokenizer
from tests.server.live import LiveServer, free_port, live_server
from tests.server.sse import DONE, assert_error, iter_sse

REPO = Path(__file__).resolve().parents[3]
MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
NUM_LAYERS, NUM_ROUTED_EXPERTS, TOP_K = 2, 3, 2  # tests/server/live.py's TINY_SERVE
Sample = tuple[str, frozenset[tuple[str, str]]]


def wait_for(condition: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.02)


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


def idle(server: LiveServer) -> bool:
    return (server.metric("customllm_num_requests_running") == 0
            and server.metric("customllm_num_requests_waiting") == 0
            and server.metric("customllm_kv_cache_usage_ratio") == 0)


# --- small endpoints ------------------------------------------------------------------------------------


def test_models_version_health(server: LiveServer, http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == "customllm" and card["object"] == "model" and card["owned_by"]
    assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
    assert card["max_model_len"] == MAX_MODEL_LEN
    oai = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in oai.models.list()] == ["customllm"]
    version = http.get("/version")
    assert version.status_code == 200 and isinstance(version.json()["version"], str) and version.json()["version"]
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("text", ["Hello, world!", "  spaces\tand\nnewlines  ", "Ünïcödé 東京 😀🎉 ✓"])
def test_tokenize_detokenize_round_trip(http: httpx.Client, tok: Tokenizer, text: str) -> None:
    body = http.post("/tokenize", json={"prompt": text}).json()
    assert body == {"tokens": tok.encode(text), "count": len(tok.encode(text)), "max_model_len": MAX_MODEL_LEN}
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    usage = http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


def test_tokenize_chat_messages_round_trip(http: httpx.Client, tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich 😀"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    assert body["tokens"] == tok.encode_chat(messages) and body["count"] == len(body["tokens"])
    rendered = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGrüß dich 😀<|im_end|>\n"
                        "<|im_start|>assistant\n")
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert http.post("/detokenize", json={"tokens": without["tokens"]}).json()["prompt"] == rendered.removesuffix(
        "<|im_start|>assistant\n")
    usage = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]


# --- API key --------------------------------------------------------------------------------------------


def test_api_key(tiny_checkpoint: Path) -> None:
    with live_server(tiny_checkpoint, ServerSettings(api_key="secret")) as server, server.client() as http:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret"},
                        {"Authorization": "Bearer secret2"}, {"Authorization": "secret"}):
            assert_error(http.get("/v1/models", headers=headers), 401)
            assert_error(http.post("/v1/completions", json=body, headers=headers), 401)
            assert_error(http.post("/v1/chat/completions", content=b"not even json", headers=headers), 401)
        assert_error(http.get("/v1/models", headers={"Authorization": b"Bearer s\xe9cret"}), 401)
        ok = {"Authorization": "Bearer secret"}
        assert http.get("/v1/models", headers=ok).status_code == 200
        assert http.post("/v1/completions", json=body, headers=ok).status_code == 200
        assert http.post("/v1/completions", json=body, headers={"authorization": "bearer secret"}).status_code == 200
        for open_path in ("/health", "/metrics", "/version"):
            assert http.get(open_path).status_code == 200, open_path
        good = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model="customllm", prompt="hi", max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="customllm", messages=[{"role": "user", "content": "hi"}])
        assert server.metric("customllm_http_requests_total", {"route": "/v1/models", "status": "401"}) == 6


# --- queue limit ----------------------------------------------------------------------------------------


def test_queue_full_gives_503_with_retry_after(tiny_checkpoint: Path) -> None:
    with live_server(tiny_checkpoint, ServerSettings(max_queued_requests=1), max_num_seqs=1) as server:
        results: list[httpx.Response] = []
        lock = threading.Lock()
        start = threading.Barrier(6)

        def fire() -> None:
            start.wait()
            response = httpx.post(server.base_url + "/v1/completions", timeout=60,
                                  json={"prompt": "queue", "max_tokens": 100, "ignore_eos": True})
            with lock:
                results.append(response)

        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(r.status_code for r in results)
        assert len(statuses) == 6 and set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
        for response in results:
            if response.status_code == 503:
                error = assert_error(response, 503)
                assert error["type"] == "ServiceUnavailableError"
                assert int(response.headers["Retry-After"]) >= 1
            else:
                assert response.json()["usage"]["completion_tokens"] == 100
        wait_for(lambda: idle(server), what="idle after the burst")
        # Refused requests hold no place in the queue: the server admits work again.
        again = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert again.status_code == 200


# --- client disconnects -------------------------------------------------------------------------------------


LONG = {"prompt": "hello", "max_tokens": MAX_MODEL_LEN - 32, "ignore_eos": True}


def test_disconnect_mid_stream_aborts_and_frees_the_cache(server: LiveServer) -> None:
    wait_for(lambda: idle(server), what="idle before the request")
    aborts = server.metric("customllm_request_success_total", {"finish_reason": "abort"})
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response:
        events = iter_sse(response)
        for _ in range(3):
            assert next(events) != DONE
        assert server.metric("customllm_num_requests_running") == 1
        assert server.metric("customllm_kv_cache_usage_ratio") > 0
    # The connection is closed here, long before 480 tokens.
    wait_for(lambda: idle(server), timeout=2.0, what="running 0 and cache usage 0 after the disconnect")
    assert server.metric("customllm_request_success_total", {"finish_reason": "abort"}) == aborts + 1
    steps = server.engine.num_steps
    time.sleep(0.1)
    assert server.engine.num_steps == steps  # nothing is generated for the departed client


def test_disconnect_during_non_streaming_request_aborts_it(server: LiveServer) -> None:
    wait_for(lambda: idle(server), what="idle before the request")
    aborts = server.metric("customllm_request_success_total", {"finish_reason": "abort"})
    generated = server.metric("customllm_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.3))
    wait_for(lambda: idle(server), timeout=2.0, what="running 0 and cache usage 0 after the client left")
    assert server.metric("customllm_request_success_total", {"finish_reason": "abort"}) == aborts + 1
    assert 0 < server.metric("customllm_generation_tokens_total") - generated < LONG["max_tokens"]
    wait_for(lambda: server.metric("customllm_http_requests_total",
                                   {"route": "/v1/completions", "status": "499"}) >= 1, what="499 counted")


def test_disconnect_of_one_streaming_client_leaves_others_alone(server: LiveServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as leaving:
        next(iter_sse(leaving))
        staying = client.post("/v1/completions", json={"prompt": "stay", "max_tokens": 20, "ignore_eos": True})
    assert staying.status_code == 200 and staying.json()["usage"]["completion_tokens"] == 20
    wait_for(lambda: idle(server), timeout=2.0, what="idle")


# --- /metrics ---------------------------------------------------------------------------------------------


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


# --- the real CLI in a subprocess ------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[str]:
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            text=True, env=os.environ.copy() | (env or {}))


def test_cli_start_up_errors_are_clear(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    procs = {  # started together: each pays the interpreter and torch start-up
        "model": _cli("--model", str(missing), "--device", "cpu"),
        "env": _cli(env={"CUSTOMLLM_PORT": "abc"}),
    }
    outputs = {name: p.communicate(timeout=60)[0] for name, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode not in (0, None), (name, outputs[name])
        assert "Traceback" not in outputs[name], (name, outputs[name])
    assert str(missing) in outputs["model"]
    assert "CUSTOMLLM_PORT" in outputs["env"] and "abc" in outputs["env"]


def _start_cli_server(tiny_checkpoint: Path, log: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _cli("--model", str(tiny_checkpoint), "--port", str(port), "--dtype", "float32", "--device", "cpu",
                "--kv-cache-tokens", "4096", *args, log=log)

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout=60, what="the CLI server's /health 200")
    return proc, base


def _drain_and_probe(proc: subprocess.Popen[str], base: str, max_tokens: int, probe_s: float) -> list[str]:
    """Stream one request, SIGTERM after 3 events, probe the draining server for probe_s: every probe (a new
    connection to /health and /v1/completions, a request on a connection kept alive from before the signal) must
    get 503 with Retry-After, never a refused connection. Returns the stream's events."""
    body = {"prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=base, timeout=30) as kept, httpx.Client(base_url=base, timeout=30) as client:
        assert kept.get("/v1/models").status_code == 200  # opens the connection that stays alive
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = iter_sse(response)
            received = [next(events) for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + probe_s
            probes = 0
            while probes == 0 or time.monotonic() < deadline:
                late = {"prompt": "late", "max_tokens": 2}
                for answer in (httpx.get(base + "/health", timeout=5),
                               httpx.post(base + "/v1/completions", json=late, timeout=5),
                               kept.post("/v1/completions", json=late)):
                    assert_error(answer, 503)
                    assert answer.headers["Retry-After"]
                    probes += 1
                time.sleep(0.05)
            received += list(events)
    return received


def test_cli_sigterm_drains_in_flight_requests_and_exits_0(tiny_checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    # Generous: on a loaded 2-core host this tiny model can take 300 ms a token.
    proc, base = _start_cli_server(tiny_checkpoint, log, "--shutdown-timeout", "120")
    try:
        received = _drain_and_probe(proc, base, max_tokens=200, probe_s=0.3)
        assert received[-1] == DONE
        chunks = [json.loads(e) for e in received[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 200
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sigterm_timeout_aborts_streams_cleanly_and_exits_0(tiny_checkpoint: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, base = _start_cli_server(tiny_checkpoint, log, "--shutdown-timeout", "1.5")
    try:
        # 480 tokens take several seconds on this tiny model: the 1.5 s timeout runs out mid-stream.
        started = time.monotonic()
        received = _drain_and_probe(proc, base, max_tokens=480, probe_s=0.8)
        assert received[-1] == DONE and received.count(DONE) == 1, received[-3:]
        chunks = [json.loads(e) for e in received[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == "abort" and finishes.count("abort") == 1, finishes[-3:]
        usage = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == [] and 0 < usage["completion_tokens"] < 480, usage
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - started < 30
        text = log.read_text()
        assert "Traceback" not in text and "CancelledError" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
