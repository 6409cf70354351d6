"""Fault injection: a model step that raises, and an engine thread that dies.

The hook is `engine.runner.execute` (and, for a dying thread, the scheduler): tests replace it on the live
engine; nothing a user can configure reaches it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine.engine import Engine, EngineDeadError
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledSequence
from server.startup import build_engine
from tests.server.live import LiveServer, live_server
from tests.server.sse import DONE, assert_error, finish_of, iter_sse


class InjectedFault(RuntimeError):
    """What the injected model step raises."""


class EngineCrash(BaseException):
    """Escapes the engine's per-step `except Exception`, the way a fatal error would."""


class StepFault:
    """Wraps ModelRunner.execute: the next `armed` calls raise, recording which requests were in the step."""

    def __init__(self, execute: Callable[..., Any], exc: BaseException) -> None:
        self._execute = execute
        self._exc = exc
        self.armed = 0
        self.failed_steps: list[list[str]] = []  # request ids of each step that raised

    def __call__(self, scheduled: list[ScheduledSequence]) -> Any:
        if self.armed:
            self.armed -= 1
            self.failed_steps.append(sorted({s.seq.request_id for s in scheduled}))
            raise self._exc
        return self._execute(scheduled)


def _body(prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} | extra


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _idle(server: LiveServer) -> bool:
    sched = server.engine.scheduler
    return server.engine.num_unfinished == 0 and sched.block_manager.usage == 0


def test_failed_step_fails_only_its_request_non_streaming(tiny_checkpoint: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with live_server(tiny_checkpoint) as server, server.client() as client:
        fault = StepFault(server.engine.runner.execute, InjectedFault("injected model failure"))
        monkeypatch.setattr(server.engine.runner, "execute", fault)
        body = _body([11, 12, 13, 14], 8)
        expected = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        fault.armed = 1
        error = assert_error(client.post("/v1/completions", json=body), 500)
        assert error["type"] == "InternalServerError"
        assert "injected" not in error["message"]  # the exception's text stays in the log
        assert len(fault.failed_steps) == 1

        # The engine keeps serving: the same request now succeeds with the same text, and nothing leaked.
        again = client.post("/v1/completions", json=body)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
        assert client.get("/health").status_code == 200
        _wait_for(lambda: _idle(server))
        assert server.metric("customllm_request_success_total", {"finish_reason": "error"}) == 1


def test_failed_step_fails_only_the_requests_in_it(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # max_num_seqs=1: request B waits in the queue while A runs, so the failing step holds A and not B.
    with live_server(tiny_checkpoint, max_num_seqs=1) as server, server.client() as client:
        fault = StepFault(server.engine.runner.execute, InjectedFault("injected model failure"))
        monkeypatch.setattr(server.engine.runner, "execute", fault)
        body_a = _body([21, 22, 23], 200, stream=True)
        body_b = _body([31, 32, 33, 34, 35], 12)
        solo_b = client.post("/v1/completions", json=body_b).json()["choices"][0]["text"]

        async def scenario() -> tuple[list[str], httpx.Response, str]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as aclient:
                async with aclient.stream("POST", "/v1/completions", json=body_a) as stream_a:
                    assert stream_a.status_code == 200
                    lines = stream_a.aiter_lines()
                    first = await anext(lines)  # A is running now
                    task_b = asyncio.ensure_future(aclient.post("/v1/completions", json=body_b))
                    await asyncio.to_thread(_wait_for, lambda: server.engine.scheduler.num_waiting == 1)
                    fault.armed = 1
                    rest = [line async for line in lines]
                reply_b = await task_b
            a_id = json.loads(first.removeprefix("data: "))["id"]
            return [first, *rest], reply_b, a_id

        lines, reply_b, a_id = asyncio.run(scenario())
        events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == DONE
        chunks = [json.loads(e) for e in events[:-1]]
        assert finish_of(chunks) == ("error", None)
        assert fault.failed_steps == [[f"{a_id}-0"]]  # only A was in the failing step
        # B, queued meanwhile, is served in full and exactly as when it ran alone.
        assert reply_b.status_code == 200, reply_b.text
        assert reply_b.json()["choices"][0]["text"] == solo_b
        assert reply_b.json()["choices"][0]["finish_reason"] == "length"
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=body_b).json()["choices"][0]["text"] == solo_b
        _wait_for(lambda: _idle(server))


def test_failed_step_with_n_and_streaming_chat(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with live_server(tiny_checkpoint) as server, server.client() as client:
        fault = StepFault(server.engine.runner.execute, InjectedFault("injected"))
        monkeypatch.setattr(server.engine.runner, "execute", fault)
        fault.armed = 1  # the first step: the prefill of both samples
        assert_error(client.post("/v1/completions", json=_body([5, 6, 7], 4, n=2)), 500)
        assert len(fault.failed_steps) == 1

        fault.armed = 1
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}) as reply:
            assert reply.status_code == 200
            events = list(iter_sse(reply))
        assert events[-1] == DONE
        assert finish_of([json.loads(e) for e in events[:-1]]) == ("error", None)
        assert client.post("/v1/completions", json=_body([5, 6, 7], 4, n=2)).status_code == 200
        _wait_for(lambda: _idle(server))


def test_failed_step_on_responses(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"input": "hi", "max_output_tokens": 5}
    with live_server(tiny_checkpoint) as server, server.client() as client:
        fault = StepFault(server.engine.runner.execute, InjectedFault("injected"))
        monkeypatch.setattr(server.engine.runner, "execute", fault)
        fault.armed = 1
        assert_error(client.post("/v1/responses", json=body), 500)
        fault.armed = 1
        with client.stream("POST", "/v1/responses", json=body | {"stream": True}) as reply:
            assert reply.status_code == 200
            events = [json.loads(e) for e in iter_sse(reply)]
        assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                               "response.content_part.added", "response.output_text.done",
                                               "response.content_part.done", "response.output_item.done",
                                               "response.failed"]
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        assert failed["output"][0]["status"] == "incomplete"
        assert client.post("/v1/responses", json=body).json()["status"] == "incomplete"  # served again
        _wait_for(lambda: _idle(server))


def _kill_by_scheduler(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def schedule() -> Any:
        raise RuntimeError("scheduler invariant broken (injected)")  # outside the step's model-failure handling
    monkeypatch.setattr(server.engine.scheduler, "schedule", schedule)


def _kill_by_scheduler_and_its_cleanup(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Freeing blocks fails too, so the engine's clean-up cannot rely on the scheduler: every stream must still end.
    def free(*_: Any) -> None:
        raise RuntimeError("block manager broken (injected)")
    monkeypatch.setattr(server.engine.scheduler.block_manager, "free", free)
    _kill_by_scheduler(server, monkeypatch)


def _kill_by_runner(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = StepFault(server.engine.runner.execute, EngineCrash("fatal (injected)"))
    fault.armed = 1
    monkeypatch.setattr(server.engine.runner, "execute", fault)


@pytest.mark.parametrize("kill", [_kill_by_scheduler, _kill_by_scheduler_and_its_cleanup, _kill_by_runner],
                         ids=["scheduler-raises", "scheduler-and-cleanup-raise", "fatal-in-step"])
def test_dead_engine_answers_503_and_in_flight_requests_end(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
                                                            kill: Callable[[LiveServer, pytest.MonkeyPatch],
                                                                           None]) -> None:
    with live_server(tiny_checkpoint) as server, httpx.Client(base_url=server.base_url, timeout=10) as client:
        async def scenario() -> tuple[list[str], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as aclient:
                plain = asyncio.ensure_future(aclient.post("/v1/completions", json=_body([41, 42], 300)))
                async with aclient.stream("POST", "/v1/completions", json=_body([51, 52], 300, stream=True)) as s:
                    lines = s.aiter_lines()
                    first = await anext(lines)
                    await asyncio.to_thread(_wait_for, lambda: server.engine.scheduler.num_running == 2)
                    kill(server, monkeypatch)
                    rest = [line async for line in lines]  # a hang here would be a ReadTimeout
                return [first, *rest], await plain

        start = time.monotonic()
        lines, plain = asyncio.run(scenario())
        assert time.monotonic() - start < 10
        events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == DONE
        assert finish_of([json.loads(e) for e in events[:-1]])[0] == "error"
        assert_error(plain, 500)
        assert server.engine.dead_reason is not None

        # From now on: 503 with the error body, at once, for health and for new work.
        start = time.monotonic()
        health = client.get("/health")
        assert_error(health, 503)
        assert_error(client.post("/v1/completions", json=_body([1, 2], 4)), 503)
        assert_error(client.post("/v1/completions", json=_body([1, 2], 4, stream=True)), 503)
        assert_error(client.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}), 503)
        assert time.monotonic() - start < 5
        assert "engine" in health.json()["error"]["message"]
        assert client.get("/metrics").status_code == 200  # still observable


def test_request_racing_the_engine_death_is_refused_not_lost(tiny_checkpoint: Path) -> None:
    """A request that passes add_request's liveness check just before the thread dies must not hang."""
    engine: Engine = build_engine(str(tiny_checkpoint), dtype="float32", device="cpu", kv_cache_tokens="1024",
                                  max_num_seqs=4, max_num_batched_tokens=64)
    engine.start()
    validate = engine.validate

    def die() -> None:
        raise EngineCrash("fatal (injected)")

    def validate_then_die(prompt: list[int], params: SamplingParams) -> None:
        # Runs inside add_request, after its liveness check and before the request is queued.
        engine._take_inbox = die  # type: ignore[method-assign]
        engine._wakeup.set()
        _wait_for(lambda: engine._thread is not None and not engine._thread.is_alive())
        validate(prompt, params)

    engine.validate = validate_then_die  # type: ignore[method-assign]

    async def submit() -> str:
        try:
            stream = engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=4))
        except EngineDeadError:
            return "refused"
        reasons = [o.finish_reason async for batch in stream for o in batch]
        return f"ended: {reasons[-1]}"

    try:
        outcome = asyncio.run(asyncio.wait_for(submit(), timeout=5))
    finally:
        engine.shutdown()
    assert outcome in ("refused", "ended: error")
    assert engine.num_unfinished == 0
