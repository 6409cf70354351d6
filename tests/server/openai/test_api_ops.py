"""Operations over real HTTP: the small endpoints, API key, queue limit and client disconnects."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.openai.api import ServerSettings
from server.tokenizer import Tokenizer
from tests.server.live import LiveServer, engine_held_after, live_server
from tests.server.openai.ops_helpers import idle, wait_for
from tests.server.sse import DONE, assert_error, iter_sse

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings


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
    # The engine waits after 5 steps until the client has gone, so the request is running when it leaves; the
    # server notices when it next writes to the closed connection.
    with engine_held_after(server, 5), httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response:
        events = iter_sse(response)
        for _ in range(3):
            assert next(events) != DONE
        assert server.metric("customllm_num_requests_running") == 1
        assert server.metric("customllm_kv_cache_usage_ratio") > 0
    # The connection was closed there, long before 480 tokens.
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
