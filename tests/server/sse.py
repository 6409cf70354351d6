"""A small Server-Sent Events reader over httpx streaming, and helpers the API tests share.

The reader follows the SSE spec's line rules (LF, CRLF or CR line ends; `data:` fields, one optional space after
the colon; comment lines; a blank line dispatches the event) and decodes every line as strict UTF-8, so a broken
character anywhere in the stream fails the test instead of turning into U+FFFD.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx

_LINE_END = re.compile(rb"\r\n|\n|\r")
DONE = "[DONE]"


def iter_sse(response: httpx.Response) -> Iterator[str]:
    """The data of each event of a streaming response, in order (multi-line data joined by newlines)."""
    buffer = b""
    data: list[str] = []
    for chunk in response.iter_bytes():
        buffer += chunk
        while True:
            match = _LINE_END.search(buffer)
            # A CR at the very end may be the first half of a CRLF still on the wire.
            if match is None or (match.group() == b"\r" and match.end() == len(buffer)):
                break
            line, buffer = buffer[: match.start()].decode("utf-8", errors="strict"), buffer[match.end():]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
    assert not buffer.strip(), f"stream ended inside an event: {buffer!r}"
    assert not data, f"stream ended without the blank line that ends an event: {data!r}"


def stream_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    """POST a streaming request; every event's data, checking the status and the content type."""
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(iter_sse(response))


def stream_chunks(client: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streaming request, asserting that `data: [DONE]` comes last and only once."""
    events = stream_events(client, path, body | {"stream": True})
    assert events and events[-1] == DONE, f"stream did not end with [DONE]: {events[-3:]}"
    assert events.count(DONE) == 1
    return [json.loads(e) for e in events[:-1]]


def completion_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    """The concatenated text deltas of one choice of a /v1/completions stream."""
    return "".join(c["text"] for chunk in chunks for c in chunk["choices"] if c["index"] == index)


def chat_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    """The concatenated content deltas of one choice of a /v1/chat/completions stream."""
    return "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"]
                   if c["index"] == index)


def finish_of(chunks: list[dict[str, Any]], index: int = 0) -> tuple[str | None, Any]:
    """(finish_reason, stop_reason) of one choice: from its only chunk that has a finish_reason."""
    finals = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index and c["finish_reason"]]
    assert len(finals) == 1, f"choice {index} has {len(finals)} chunks with a finish_reason"
    return finals[0]["finish_reason"], finals[0].get("stop_reason")


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    """Check the status and OpenAI's error body (and that it leaks no internals); return the `error` object."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["code"] == status, error
    if param is not None:
        assert error["param"] == param, error
    for leak in ("Traceback", 'File "', ".py", "/work", "site-packages"):
        assert leak not in response.text, f"error body leaks {leak!r}: {response.text}"
    return error
