"""Every request limit at its boundary: the limit itself is accepted, one past it is refused with the error body
naming the field and the number, and each limit is documented in docs/limits.md with what controls it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cli import build_parser
from server.openai.api import ServerSettings
from server.openai.protocol import MAX_LOGPROBS, MAX_N, MAX_STOP_STRING_LEN, MAX_STOP_STRINGS
from server.openai.protocol.responses import MAX_METADATA_KEYS
from server.openai.serving import MAX_CHOICES
from tests.server.live import LiveServer, live_server
from tests.server.sse import assert_error

MAX_MODEL_LEN = 128
BODY_LIMIT = 8192
C, H, R = "/v1/completions", "/v1/chat/completions", "/v1/responses"
DOC = Path(__file__).resolve().parents[2] / "docs" / "limits.md"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, ServerSettings(max_request_bytes=BODY_LIMIT), max_model_len=MAX_MODEL_LEN,
                     max_num_seqs=64) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def _chat(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} | extra


# (name, path, body at the limit, body one past it, param the error names, number the message gives)
BOUNDARIES: list[tuple[str, str, dict[str, Any], dict[str, Any], str, int]] = [
    ("n", C, {"prompt": "x", "max_tokens": 1, "n": MAX_N}, {"prompt": "x", "max_tokens": 1, "n": MAX_N + 1},
     "n", MAX_N),
    ("n chat", H, _chat(n=MAX_N), _chat(n=MAX_N + 1), "n", MAX_N),
    ("stop strings", C, {"prompt": "x", "max_tokens": 1, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS)]},
     {"prompt": "x", "max_tokens": 1, "stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop",
     MAX_STOP_STRINGS),
    ("stop string length", H, _chat(stop=["z" * MAX_STOP_STRING_LEN]), _chat(stop=["z" * (MAX_STOP_STRING_LEN + 1)]),
     "stop", MAX_STOP_STRING_LEN),
    ("logprobs", C, {"prompt": "x", "max_tokens": 1, "logprobs": MAX_LOGPROBS},
     {"prompt": "x", "max_tokens": 1, "logprobs": MAX_LOGPROBS + 1}, "logprobs", MAX_LOGPROBS),
    ("top_logprobs", H, _chat(logprobs=True, top_logprobs=MAX_LOGPROBS),
     _chat(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), "top_logprobs", MAX_LOGPROBS),
    ("prompt tokens", C, {"prompt": [7] * (MAX_MODEL_LEN - 1), "max_tokens": 1},
     {"prompt": [7] * MAX_MODEL_LEN, "max_tokens": 1}, "max_tokens", MAX_MODEL_LEN),
    ("prompt + max_tokens", C, {"prompt": [7] * 100, "max_tokens": MAX_MODEL_LEN - 100, "ignore_eos": True},
     {"prompt": [7] * 100, "max_tokens": MAX_MODEL_LEN - 99}, "max_tokens", MAX_MODEL_LEN),
    ("metadata keys", R, {"input": "x", "max_output_tokens": 1,
                          "metadata": {f"k{i}": "v" for i in range(MAX_METADATA_KEYS)}},
     {"input": "x", "max_output_tokens": 1, "metadata": {f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}},
     "metadata", MAX_METADATA_KEYS),
    ("choices per request", C, {"prompt": ["a"] * (MAX_CHOICES // MAX_N), "max_tokens": 1, "n": MAX_N},
     {"prompt": ["a"] * (MAX_CHOICES // MAX_N + 1), "max_tokens": 1, "n": MAX_N}, "n", MAX_CHOICES),
]


@pytest.mark.parametrize(("name", "path", "at_limit", "over", "param", "number"), BOUNDARIES,
                         ids=[b[0] for b in BOUNDARIES])
def test_limit_boundary(http: httpx.Client, name: str, path: str, at_limit: dict[str, Any], over: dict[str, Any],
                        param: str, number: int) -> None:
    ok = http.post(path, json=at_limit)
    assert ok.status_code == 200, ok.text
    error = assert_error(http.post(path, json=over), 400, param)
    assert str(number) in error["message"], error
    # The same request streamed is refused the same way, before any event is sent.
    error = assert_error(http.post(path, json=over | {"stream": True}), 400, param)
    assert str(number) in error["message"], error


def test_prompt_over_the_context_names_the_numbers(http: httpx.Client) -> None:
    error = assert_error(http.post(C, json={"prompt": [7] * 200, "max_tokens": 5}), 400)
    for number in (MAX_MODEL_LEN, 200, 5, 205):
        assert re.search(rf"\b{number}\b", error["message"]), error
    # A chat without max_tokens may fill the context, but its messages alone must fit.
    error = assert_error(http.post(H, json={"messages": [{"role": "user", "content": "hi " * 300}]}), 400,
                         "messages")
    assert str(MAX_MODEL_LEN) in error["message"], error


def test_responses_input_and_max_output_tokens_fill_the_context_at_most(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hi"}]
    num_input = http.post("/tokenize", json={"messages": messages}).json()["count"]
    room = MAX_MODEL_LEN - num_input
    ok = http.post(R, json={"input": "hi", "max_output_tokens": room})
    assert ok.status_code == 200 and ok.json()["usage"]["input_tokens"] == num_input, ok.text
    for stream in (False, True):
        error = assert_error(http.post(R, json={"input": "hi", "max_output_tokens": room + 1, "stream": stream}), 400,
                             "max_output_tokens")
        assert str(MAX_MODEL_LEN) in error["message"] and "max_output_tokens" in error["message"], error
    # Without max_output_tokens the output may fill the context, but the input alone must fit.
    error = assert_error(http.post(R, json={"input": "hi " * 300}), 400, "input")
    assert str(MAX_MODEL_LEN) in error["message"], error


def _body_of_size(size: int) -> bytes:
    head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_body_size_boundary(http: httpx.Client) -> None:
    at_limit = http.post(C, content=_body_of_size(BODY_LIMIT), headers={"content-type": "application/json"})
    assert at_limit.status_code != 413, at_limit.text  # parsed (and then judged on its content)
    over = http.post(C, content=_body_of_size(BODY_LIMIT + 1), headers={"content-type": "application/json"})
    error = assert_error(over, 413, "body")
    assert str(BODY_LIMIT) in error["message"]
    json.loads(_body_of_size(BODY_LIMIT))  # the boundary body is valid JSON, so only its size was judged


def test_every_limit_is_documented() -> None:
    doc = DOC.read_text()
    defaults = build_parser().parse_args([])
    settings = ServerSettings()
    expected = {
        "`n`": MAX_N, "`logprobs`": MAX_LOGPROBS, "`top_logprobs`": MAX_LOGPROBS, "`stop`": MAX_STOP_STRINGS,
        "stop string length": MAX_STOP_STRING_LEN, "choices per request": MAX_CHOICES,
        "`/v1/responses` `metadata`": MAX_METADATA_KEYS,
        "--max-request-bytes": settings.max_request_bytes, "--max-queued-requests": settings.max_queued_requests,
    }
    assert defaults.max_request_bytes == settings.max_request_bytes
    assert defaults.max_queued_requests == settings.max_queued_requests
    rows = [line for line in doc.splitlines() if line.startswith("|")]
    for key, value in expected.items():
        row = next((r for r in rows if key in r), None)
        assert row is not None, f"docs/limits.md has no table row for {key}"
        assert f"{value:,}" in row or str(value) in row, f"docs/limits.md row for {key} lacks {value}: {row}"
    for flag in ("--max-model-len", "--max-request-bytes", "--max-queued-requests"):
        assert flag in doc
