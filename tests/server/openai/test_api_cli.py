"""The real CLI (python -m server) in a subprocess: clear start-up errors, graceful SIGTERM drain, and its timeout
aborting streams cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server.live import free_port
from tests.server.openai.ops_helpers import wait_for
from tests.server.sse import DONE, assert_error, iter_sse

REPO = Path(__file__).resolve().parents[3]


def _cli(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[str]:
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                            text=True, env=os.environ.copy() | (env or {}))


def test_cli_start_up_errors_are_clear(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    procs = {  # started together: each pays the interpreter and torch start-up
        "model": _cli("--model", str(missing), "--device", "cpu"),
        "env": _cli(env={"CUSTOMLLM_PORT": "abc"}),
        "speculative": _cli("--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}'),
    }
    outputs = {name: p.communicate(timeout=60)[0] for name, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode not in (0, None), (name, outputs[name])
        assert "Traceback" not in outputs[name], (name, outputs[name])
    assert str(missing) in outputs["model"]
    assert "CUSTOMLLM_PORT" in outputs["env"] and "abc" in outputs["env"]
    assert "speculative method 'eagle' is not supported" in outputs["speculative"], outputs["speculative"]


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
