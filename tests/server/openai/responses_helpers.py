"""Helpers of the /v1/responses tests: a request, a stream's events, a response without what two runs differ in."""

from __future__ import annotations

import json
from typing import Any

import httpx

R = "/v1/responses"
VOLATILE = {"id", "created_at", "completed_at"}  # differ between two runs of one request, as do items' ids


def respond(http: httpx.Client, **body: Any) -> dict[str, Any]:
    """The JSON of a request that must succeed."""
    response = http.post(R, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(http: httpx.Client, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every SSE event, checking that each `event:` line names its data's type."""
    events = []
    with http.stream("POST", R, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        names = []
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                events.append((names[-1], json.loads(line.removeprefix("data: "))))
    assert len(names) == len(events) and all(name == data["type"] for name, data in events)
    return events


def stable(response: dict[str, Any]) -> dict[str, Any]:
    """A response without its ids, times and prefix-cache hits (a second run finds the first's blocks), for
    comparing two runs."""
    out = {k: v for k, v in response.items() if k not in VOLATILE}
    out["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    out["usage"] = response["usage"] | {"input_tokens_details": None}
    return out
