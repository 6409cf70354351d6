"""Security properties: constant-time API key check, no internals in error bodies, loopback by default, CORS off
unless configured, and hostile JSON that the schema-driven fuzzer does not generate."""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser
from server.openai import api as api_module
from server.openai.api import ServerSettings
from tests.server.live import LiveServer, live_server
from tests.server.sse import assert_error

C, H, R = "/v1/completions", "/v1/chat/completions", "/v1/responses"
JSON = {"content-type": "application/json"}
LEAKS = ("Traceback", 'File "', '.py"', ".py:", "/work", "site-packages")


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, ServerSettings(api_key="s3cret-key", max_request_bytes=1 << 16)) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": "Bearer s3cret-key"}) as client:
        yield client


def test_api_key_is_compared_with_hmac_compare_digest(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    assert api_module.hmac is hmac  # the middleware calls hmac.compare_digest through the module
    monkeypatch.setattr(hmac, "compare_digest", spy)
    with server.client() as client:
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer s3cret-kez"}), 401)
        assert calls == [(b"s3cret-kez", b"s3cret-key")]
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200 and len(calls) == 2
        # The key a client sent is never echoed back.
        error = assert_error(client.get("/v1/models", headers={"Authorization": "Bearer guess-123"}), 401)
        assert "guess-123" not in json.dumps(error) and "s3cret" not in json.dumps(error)


def test_cli_binds_loopback_and_cors_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CUSTOMLLM_HOST", "CUSTOMLLM_CORS_ALLOW_ORIGINS", "CUSTOMLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1"
    assert args.cors_allow_origins == ""
    assert args.api_key is None
    assert ServerSettings().cors_allow_origins == ()


def test_no_cors_headers_unless_configured(server: LiveServer, tiny_checkpoint: Path) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with server.client() as client:
        for response in (client.options(C, headers=preflight), client.get("/health", headers={"Origin": "https://x"}),
                         client.post(C, json={"prompt": "x", "max_tokens": 1},
                                     headers={"Origin": "https://x", "Authorization": "Bearer s3cret-key"})):
            assert not any(h.lower().startswith("access-control-") for h in response.headers), response.headers
    allowed = "https://app.example"
    with live_server(tiny_checkpoint, ServerSettings(cors_allow_origins=(allowed,))) as configured, \
            configured.client() as client:
        ok = client.options(C, headers=preflight | {"Origin": allowed})
        assert ok.headers.get("access-control-allow-origin") == allowed
        other = client.options(C, headers=preflight)
        assert other.headers.get("access-control-allow-origin") is None
        assert client.get("/health", headers={"Origin": "https://x"}).headers.get("access-control-allow-origin") \
            is None


# Error bodies of every kind: none may show a traceback or a path, whatever the input.
ERROR_CASES: list[tuple[str, str, bytes, dict[str, str], int]] = [
    ("POST", C, b'{"prompt": "x", "max_tokens": -1}', JSON, 400),
    ("POST", C, b'{"prompt": ', JSON, 400),
    ("POST", C, b"\xff\xfe{}", JSON, 400),
    ("POST", C, b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", JSON, 400),  # nesting deeper than any parser
    ("POST", C, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", JSON, 400),  # beyond int parsing limits
    ("POST", C, b'{"prompt": "x", "temperature": NaN}', JSON, 400),
    ("POST", C, b'{"prompt": "x", "temperature": 1e999}', JSON, 400),
    ("POST", C, b'{"prompt": "\\ud800 lone surrogate"}', JSON, 400),
    ("POST", H, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', JSON, 400),
    ("POST", R, b'{"input": [{"role": "user", "content": [{"type": "input_text", "text": "\\udfff"}]}]}', JSON, 400),
    ("POST", R, b'{"input": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", JSON, 400),
    ("POST", R, b'{"input": "x", "max_output_tokens": ' + b"9" * 5000 + b"}", JSON, 400),
    ("POST", R, b'{"input": [{"type": "function_call_output", "call_id": "c", "output": 7}]}', JSON, 400),
    ("POST", "/tokenize", b'{"prompt": "\\ud83d"}', JSON, 400),
    ("POST", "/tokenize", b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', JSON, 400),
    ("POST", C, b'{"prompt": [1e400]}', JSON, 400),
    ("POST", C, b'{"prompt": "x", "max_tokens": 99999999999999999999999}', JSON, 400),
    ("POST", "/detokenize", b'{"tokens": [99999999999999999999999]}', JSON, 400),
    ("POST", C, b"x" * (1 << 17), JSON, 413),
    ("POST", C, b'{"prompt": "x"}', {"content-type": "text/plain"}, 400),
    ("GET", "/v1/../../etc/passwd", b"", {}, 404),
    ("GET", "/v1/models/%2e%2e%2fserver%2fapi.py", b"", {}, 404),
    ("DELETE", C, b"", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "content", "headers", "status"), ERROR_CASES,
                         ids=[f"{i}-{c[1]}-{c[4]}" for i, c in enumerate(ERROR_CASES)])
def test_error_bodies_show_no_internals(http: httpx.Client, method: str, path: str, content: bytes,
                                        headers: dict[str, str], status: int) -> None:
    response = http.request(method, path, content=content or None, headers=headers)
    assert_error(response, status)
    for leak in LEAKS:
        assert leak not in response.text
    assert http.post(C, json={"prompt": "still serving", "max_tokens": 1}).status_code == 200


def test_nul_bytes_in_text_are_plain_input(http: httpx.Client) -> None:
    reply = http.post(C, json={"prompt": "a\u0000b", "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    reply = http.post(H, json={"messages": [{"role": "user", "content": "\u0000"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
