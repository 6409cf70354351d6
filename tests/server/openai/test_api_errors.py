"""Every class of bad input gets its status and OpenAI's error body, never a 422 or a stack trace, and the server
keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.openai.api import ServerSettings
from tests.server.live import LiveServer, live_server
from tests.server.sse import assert_error

LIMIT = 64 * 1024
C, H = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Hi"}]
JSON = {"content-type": "application/json"}
VOCAB = 49152


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, ServerSettings(max_request_bytes=LIMIT)) as live:
        yield live


def still_serving(http: httpx.Client) -> None:
    response = http.post(C, json={"prompt": "still there?", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


# (path, JSON body, param the error names, words the message must contain)
BAD_JSON: list[tuple[str, dict[str, Any], str | None, list[str]]] = [
    # unknown fields, named
    (C, {"prompt": "x", "foo": 1}, "foo", ["foo"]),
    (H, {"messages": MSGS, "bar": 2}, "bar", ["bar"]),
    (H, {"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages[0].mood", ["mood"]),
    (C, {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "extra": 1}},
     "stream_options.extra", ["extra"]),
    # missing required fields
    (C, {"max_tokens": 3}, "prompt", ["prompt"]),
    (H, {"max_tokens": 3}, "messages", ["messages"]),
    # wrong types (no lax coercion)
    (C, {"prompt": "x", "temperature": "0.5"}, "temperature", ["temperature"]),
    (C, {"prompt": "x", "max_tokens": "16"}, "max_tokens", ["max_tokens"]),
    (C, {"prompt": "x", "max_tokens": 1.5}, "max_tokens", ["max_tokens"]),
    (C, {"prompt": "x", "stream": "yes"}, "stream", ["stream"]),
    (C, {"prompt": "x", "n": True}, "n", ["n"]),
    (C, {"prompt": 5}, "prompt", ["prompt"]),
    (C, {"prompt": ["a", 1]}, "prompt", ["prompt"]),
    (C, {"prompt": "x", "stop": 5}, "stop", ["stop"]),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", ["logit_bias"]),
    (C, {"prompt": "x", "logit_bias": {"5": "high"}}, None, ["logit_bias"]),
    (H, {"messages": "hello"}, "messages", ["messages"]),
    (H, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", ["role"]),
    (H, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages[0].content", ["text"]),
    # out of range
    (C, {"prompt": "x", "temperature": 2.5}, "temperature", ["temperature", "2.5"]),
    (C, {"prompt": "x", "temperature": -0.1}, "temperature", ["temperature"]),
    (C, {"prompt": "x", "top_p": 0}, "top_p", ["top_p"]),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p", ["top_p"]),
    (C, {"prompt": "x", "n": 0}, "n", ["n"]),
    (C, {"prompt": "x", "n": 17}, "n", ["n"]),
    (H, {"messages": MSGS, "n": 100}, "n", ["n"]),
    (C, {"prompt": "x", "logprobs": 21}, "logprobs", ["logprobs"]),
    (C, {"prompt": "x", "logprobs": -1}, "logprobs", ["logprobs"]),
    (H, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", ["top_logprobs"]),
    (C, {"prompt": "x", "presence_penalty": 3}, "presence_penalty", ["presence_penalty"]),
    (C, {"prompt": "x", "max_tokens": -1}, "max_tokens", ["max_tokens"]),
    (H, {"messages": MSGS, "max_tokens": 0}, "max_tokens", ["max_tokens"]),
    (C, {"prompt": "x", "top_k": -2}, "top_k", ["top_k"]),
    (C, {"prompt": "x", "min_p": 1.5}, "min_p", ["min_p"]),
    (C, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", ["repetition_penalty"]),
    (C, {"prompt": "x", "seed": 2**64}, "seed", ["seed"]),
    (C, {"prompt": "x", "logit_bias": {"5": 101}}, None, ["logit_bias"]),
    # stop strings
    (C, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop", ["16"]),
    (C, {"prompt": "x", "stop": [""]}, "stop", ["stop"]),
    # empty prompts
    (C, {"prompt": ""}, "prompt", ["empty"]),
    (C, {"prompt": []}, "prompt", ["prompt"]),
    (C, {"prompt": [""]}, "prompt", ["empty"]),
    (C, {"prompt": [[]]}, "prompt", ["empty"]),
    (H, {"messages": []}, "messages", ["messages"]),
    # token ids outside the vocabulary
    (C, {"prompt": [1, VOCAB]}, "prompt", [str(VOCAB)]),
    (C, {"prompt": [[1], [2, VOCAB + 5]]}, "prompt", [str(VOCAB + 5)]),
    (C, {"prompt": [1, -1]}, "prompt", ["prompt"]),
    (C, {"prompt": "x", "logit_bias": {str(VOCAB): 1}}, "logit_bias", [str(VOCAB)]),
    (H, {"messages": MSGS, "logit_bias": {str(VOCAB + 1): 1}}, "logit_bias", [str(VOCAB + 1)]),
    (C, {"prompt": "x", "stop_token_ids": [VOCAB]}, "stop_token_ids", [str(VOCAB)]),
    (H, {"messages": MSGS, "stop_token_ids": [VOCAB]}, "stop_token_ids", [str(VOCAB)]),
    (C, {"prompt": "x", "stop_token_ids": [-3]}, "stop_token_ids[0]", ["stop_token_ids"]),
    ("/detokenize", {"tokens": [5, VOCAB]}, "tokens", [str(VOCAB)]),
    # unsupported features
    (C, {"prompt": "x", "best_of": 2}, "best_of", ["best_of"]),
    (C, {"prompt": "x", "suffix": "tail"}, "suffix", ["suffix"]),
    (H, {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f f"}}]}, "tools[0].function.name",
     ["name"]),
    (H, {"messages": MSGS, "tool_choice": "required"}, "tool_choice", ["tool_choice"]),
    (H, {"messages": MSGS, "store": True}, "store", ["store"]),
    (H, {"messages": MSGS, "modalities": ["audio"]}, "modalities", ["modalities"]),
    (H, {"messages": MSGS, "return_hidden_states": True}, "return_hidden_states", ["return_hidden_states"]),
    (C, {"prompt": "x", "continue_final_message": True}, "continue_final_message", ["chat"]),
    (C, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs", ["prompt_logprobs"]),
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens", ["max_tokens"]),
    (C, {"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens", ["min_tokens"]),
    (H, {"messages": MSGS, "top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    (C, {"prompt": ["p"] * 20, "n": 16}, "n", ["256"]),
    # stream_options only with stream
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
    (H, {"messages": MSGS, "stream": False, "stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
    # /tokenize takes exactly one input
    ("/tokenize", {"prompt": "x", "messages": MSGS}, "prompt", ["exactly one"]),
    ("/tokenize", {}, "prompt", ["exactly one"]),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": False}, "add_generation_prompt", ["messages"]),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), BAD_JSON,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_JSON)])
def test_bad_request_is_400_naming_the_field(http: httpx.Client, path: str, body: dict[str, Any], param: str | None,
                                             words: list[str]) -> None:
    error = assert_error(http.post(path, json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error
    still_serving(http)


@pytest.mark.parametrize(("path", "body"), [
    (C, {"prompt": "x", "stream": True}),  # a bad stream request fails before streaming starts
    (H, {"messages": MSGS, "stream": True}),
])
def test_stream_request_errors_are_json_not_sse(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    response = http.post(path, json=body | {"temperature": 9})
    assert response.headers["content-type"].startswith("application/json")
    assert_error(response, 400, "temperature")


@pytest.mark.parametrize(("content", "headers", "words"), [
    (b'{"prompt": "x",', JSON, ["JSON"]),
    (b'{"prompt": "x", "max_tokens": 2', JSON, ["JSON"]),
    (b"\xff\xfe\x00", JSON, ["body"]),  # not UTF-8: FastAPI's own 400, in our error body
    (b"[1, 2]", JSON, ["JSON object"]),
    (b'"just a string"', JSON, ["JSON object"]),
    (b"null", JSON, ["JSON object"]),
    (b"", JSON, ["JSON object"]),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, ["Content-Type"]),
    (b'{"prompt": "x"}', {"content-type": "application/x-www-form-urlencoded"}, ["Content-Type"]),
    (b'{"prompt": "x", "temperature": NaN}', JSON, ["temperature"]),
    (b'{"prompt": "x", "temperature": Infinity}', JSON, ["temperature"]),
])
def test_unparseable_bodies(http: httpx.Client, content: bytes, headers: dict[str, str], words: list[str]) -> None:
    for path in (C, H):
        error = assert_error(http.post(path, content=content, headers=headers), 400)
        for word in words:
            assert word in error["message"], error
    still_serving(http)


def test_context_overflow_names_the_numbers(http: httpx.Client) -> None:
    num_prompt = len(http.post("/tokenize", json={"prompt": "hello " * 10}).json()["tokens"])
    error = assert_error(http.post(C, json={"prompt": "hello " * 10, "max_tokens": 600}), 400, "max_tokens")
    for number in ("512", str(num_prompt), "600", str(num_prompt + 600)):
        assert number in error["message"], error
    error = assert_error(http.post(C, json={"prompt": [7] * 600, "max_tokens": 1}), 400)
    assert "512" in error["message"] and "600" in error["message"], error
    error = assert_error(http.post(H, json={"messages": MSGS, "max_tokens": 700}), 400, "max_tokens")
    assert "512" in error["message"] and "700" in error["message"], error
    # Without max_tokens a chat fills the context, but the messages alone must fit.
    error = assert_error(http.post(H, json={"messages": [{"role": "user", "content": "hi " * 600}]}), 400, "messages")
    assert "512" in error["message"], error
    # The boundary itself is allowed: prompt + max_tokens == 512.
    ok = http.post(C, json={"prompt": [7] * 500, "max_tokens": 12, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 512, ok.text
    still_serving(http)


@pytest.mark.parametrize(("path", "body"), [
    (C, {"prompt": "x", "model": "gpt-4"}),
    (H, {"messages": MSGS, "model": "gpt-4"}),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}),
    ("/detokenize", {"tokens": [1], "model": "gpt-4"}),
])
def test_unknown_model_is_404(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    error = assert_error(http.post(path, json=body), 404, "model")
    assert "gpt-4" in error["message"] and "customllm" in error["message"]
    still_serving(http)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", C, 405), ("GET", H, 405), ("PUT", C, 405), ("DELETE", "/v1/models", 405), ("POST", "/health", 405),
    ("GET", "/v1/nothing-here", 404), ("POST", "/v2/completions", 404), ("GET", "/index.html", 404), ("POST", "/", 405),
    ("GET", "/v1/models/customllm/extra", 404),
])
def test_wrong_method_or_unknown_path(http: httpx.Client, method: str, path: str, status: int) -> None:
    response = http.request(method, path)
    assert "detail" not in response.json()
    error = assert_error(response, status)
    if status == 404:
        assert error["type"] == "NotFoundError"


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {"prompt": "a" * (LIMIT + 10)}
    assert_error(http.post(C, json=big), 413, "body")
    assert_error(http.post(H, json={"messages": [{"role": "user", "content": "b" * LIMIT}]}), 413, "body")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds for a streamed upload too
        yield b'{"prompt": "'
        for _ in range(2 * LIMIT // 4096):
            yield b"c" * 4096
        yield b'"}'

    error = assert_error(http.post(C, content=chunked(), headers=JSON), 413, "body")
    assert str(LIMIT) in error["message"]
    # Just under the limit is parsed (and here refused for its length, not its size).
    under = http.post(C, json={"prompt": "a " * (LIMIT // 2 - 100), "max_tokens": 1})
    assert under.status_code == 400 and under.json()["error"]["param"] == "max_tokens", under.text
    still_serving(http)


def test_no_422_was_ever_sent(server: LiveServer, http: httpx.Client) -> None:
    """Runs last in this module: the HTTP counter saw every response above."""
    still_serving(http)
    assert server.metric("customllm_http_requests_total", {"status": "400"}) >= len(BAD_JSON)
    assert server.metric("customllm_http_requests_total", {"status": "422"}) == 0
    assert server.metric("customllm_http_requests_total", {"status": "500"}) == 0
