"""The soak's checks and report (tools/soak.py runs the traffic): every request's stream or body checked for
well-formed choices and consistent usage, the server's /metrics and resident memory read, and the report that
says what failed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import httpx


@dataclasses.dataclass
class _Outcome:
    status: int
    cancelled: bool = False  # the client went away on purpose
    texts: list[str] | None = None  # per choice, when completed
    problem: str | None = None
    completion_tokens: int = 0


@dataclasses.dataclass
class SoakReport:
    duration: float = 0.0
    started: int = 0
    completed: int = 0
    cancelled: int = 0  # client disconnects on purpose
    streamed: int = 0
    seeded: int = 0
    with_stop: int = 0
    completion_tokens: int = 0
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    server_5xx: float = 0.0
    running_after: float = -1.0
    kv_usage_after: float = -1.0
    rss_warm_kb: int = 0
    rss_end_kb: int = 0
    rss_idle_kb: int = 0
    replayed: int = 0
    replay_mismatches: list[str] = dataclasses.field(default_factory=list)
    max_memory_growth: float = 0.05

    @property
    def memory_growth(self) -> float:
        return (self.rss_end_kb - self.rss_warm_kb) / self.rss_warm_kb if self.rss_warm_kb else 0.0

    def problems(self) -> list[str]:
        """Every check that failed, in words; empty when the soak passed."""
        out = [f"{len(self.errors)} request errors, first: {self.errors[:5]}"] if self.errors else []
        if self.server_5xx:
            out.append(f"the server counted {self.server_5xx:g} 5xx responses")
        if self.running_after != 0 or self.kv_usage_after != 0:
            out.append(f"not idle after the soak: running {self.running_after:g}, kv usage {self.kv_usage_after:g}")
        if self.rss_warm_kb and self.memory_growth >= self.max_memory_growth:
            out.append(f"resident memory grew {self.memory_growth:.1%} (limit {self.max_memory_growth:.0%})")
        if self.replay_mismatches:
            out.append(f"{len(self.replay_mismatches)} replays differ: {self.replay_mismatches[:3]}")
        if self.completed == 0:
            out.append("no request completed")
        return out

    def summary(self) -> str:
        rss = (f"{self.rss_warm_kb / 1024:.1f} MiB after warm-up -> {self.rss_end_kb / 1024:.1f} MiB at the end "
               f"({self.memory_growth:+.2%}); {self.rss_idle_kb / 1024:.1f} MiB idle afterwards"
               if self.rss_warm_kb else "not measured")
        lines = [
            f"duration {self.duration:.1f} s; requests started {self.started}, completed {self.completed}, "
            f"cancelled by the client {self.cancelled}; streamed {self.streamed}, seeded {self.seeded}, "
            f"with stop strings {self.with_stop}; {self.completion_tokens} completion tokens",
            "statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())),
            f"errors: {len(self.errors)}; server-counted 5xx: {self.server_5xx:g}",
            f"after: running {self.running_after:g}, kv cache usage {self.kv_usage_after:g}",
            f"resident memory: {rss}",
            f"replays: {self.replayed}, mismatches {len(self.replay_mismatches)}",
            "RESULT: " + ("PASS" if not self.problems() else "FAIL: " + "; ".join(self.problems())),
        ]
        return "\n".join(lines)


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def metric(client: httpx.AsyncClient, name: str, label_prefix: tuple[str, str] | None = None) -> float:
    """Sum of a metric's samples on /metrics, optionally only those whose label starts with a prefix."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and (label_prefix is None
                                      or s.labels.get(label_prefix[0], "").startswith(label_prefix[1])))


def check_usage(usage: dict[str, Any] | None, body: dict[str, Any], finish_reasons: list[str]) -> str | None:
    """Why `usage` is inconsistent with the request and its choices, or None."""
    if not usage:
        return "no usage"
    n = body.get("n", 1)
    prompt, completion, total = usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
    if total != prompt + completion:
        return f"usage total {total} != {prompt} + {completion}"
    if isinstance(body.get("prompt"), list) and prompt != len(body["prompt"]):
        return f"prompt_tokens {prompt} != {len(body['prompt'])} prompt ids"
    if not 0 < completion <= n * body["max_tokens"]:
        return f"completion_tokens {completion} outside (0, {n * body['max_tokens']}]"
    if all(r == "length" for r in finish_reasons) and completion != n * body["max_tokens"]:
        return f"every choice hit the length limit but completion_tokens {completion} != {n * body['max_tokens']}"
    return None


def _check_choices(finish: dict[int, str | None], n: int) -> str | None:
    if sorted(finish) != list(range(n)):
        return f"choice indexes {sorted(finish)} for n={n}"
    bad = {i: r for i, r in finish.items() if r not in ("stop", "length")}
    return f"finish reasons {bad}" if bad else None


async def stream_request(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                         disconnect_after: int | None) -> _Outcome:
    """One streaming request, closed by the client after `disconnect_after` events if given."""
    body = body | {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events: list[str] = []
    async with client.stream("POST", path, json=body) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return _Outcome(reply.status_code, problem=f"status {reply.status_code}: {reply.text[:200]}")
        async for line in reply.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return _Outcome(200, problem=f"not an SSE data line: {line[:100]!r}")
            events.append(line[6:])
            if disconnect_after is not None and len(events) >= disconnect_after:
                return _Outcome(200, cancelled=True)  # leaving the block closes the connection mid-stream
    if not events or events[-1] != "[DONE]":
        return _Outcome(200, problem=f"stream does not end with [DONE] (last: {events[-1:]})")
    n = body.get("n", 1)
    texts = [""] * n
    finish: dict[int, str | None] = {}
    usage = None
    for event in events[:-1]:
        chunk = json.loads(event)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            i = choice["index"]
            texts[i] += choice["text"] if "text" in choice else (choice["delta"].get("content") or "")
            if choice.get("finish_reason") is not None:
                if finish.get(i) is not None:
                    return _Outcome(200, problem=f"choice {i} finished twice")
                finish[i] = choice["finish_reason"]
    if json.loads(events[-2]).get("choices"):
        return _Outcome(200, problem="no final usage chunk")
    problem = _check_choices(finish, n) or check_usage(usage, body, [r or "" for r in finish.values()])
    return _Outcome(200, texts=texts, problem=problem, completion_tokens=(usage or {}).get("completion_tokens", 0))


async def plain_request(client: httpx.AsyncClient, path: str, body: dict[str, Any],
                        disconnect_after: float | None) -> _Outcome:
    """One non-streaming request, abandoned by the client after `disconnect_after` seconds if given."""
    try:
        reply = await asyncio.wait_for(client.post(path, json=body), disconnect_after)
    except TimeoutError:
        return _Outcome(0, cancelled=True)
    if reply.status_code != 200:
        return _Outcome(reply.status_code, problem=f"status {reply.status_code}: {reply.text[:200]}")
    data = reply.json()
    choices = sorted(data["choices"], key=lambda c: c["index"])
    finish = {c["index"]: c["finish_reason"] for c in choices}
    texts = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
    problem = _check_choices(finish, body.get("n", 1)) or check_usage(data.get("usage"), body, list(finish.values()))
    return _Outcome(200, texts=texts, problem=problem,
                    completion_tokens=(data.get("usage") or {}).get("completion_tokens", 0))

