"""The server image, built and run: health, the API, metrics, its user, a mounted checkpoint, SIGTERM.

One container per module serves the tiny checkpoint mounted read-only at /models/tiny, published on a free
loopback port. The last test stops it with SIGTERM, so the order of the tests here matters.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.local_server import free_port
from model.ops import cpu_extension
from tests.image.engine import Engine
from tests.server.live import TINY_SERVE
from tests.server.sse import DONE, iter_sse

HEALTH_TIMEOUT_S = 120  # the issue measured 12 s on an idle machine; this one is shared by several builds
SHUTDOWN_TIMEOUT_S = 30
USER_UID = 10001


@dataclass(frozen=True)
class Container:
    name: str
    base_url: str
    startup_s: float


def _running(engine: Engine, name: str) -> bool:
    return bool(engine.inspect(name)[0]["State"]["Running"])


def _logs(engine: Engine, name: str) -> str:
    result = engine.run("logs", name, check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def container(engine: Engine, server_image: str, models_dir: Path) -> Iterator[Container]:
    name = f"customllm-image-test-{os.getpid()}"
    port = free_port()
    engine.run("rm", "-f", name, check=False)
    started = time.monotonic()
    engine.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
               "-v", f"{models_dir / 'tiny'}:/models/tiny:ro", server_image,
               "--model", "/models/tiny", "--dtype", "float32", "--kv-cache-tokens", "4096",
               "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            elapsed = time.monotonic() - started
            assert elapsed < HEALTH_TIMEOUT_S, f"no healthy /health after {elapsed:.0f} s:\n{_logs(engine, name)}"
            assert _running(engine, name), f"the container exited:\n{_logs(engine, name)}"
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield Container(name, base_url, elapsed)
    finally:
        engine.run("rm", "-f", name, check=False)


def test_image_declares_a_healthcheck_that_passes(engine: Engine, container: Container) -> None:
    (image,) = engine.inspect(container.name)
    (config,) = engine.inspect(image["Image"], kind="image")
    # docker: Config.Healthcheck; podman (a --format docker image): a top-level Healthcheck.
    check = config["Config"].get("Healthcheck") or config.get("Healthcheck")
    assert check and "/health" in " ".join(check["Test"]), f"no HEALTHCHECK on /health in the image: {check}"
    if engine.name == "podman":
        # Without systemd nothing schedules podman's checks; run the image's check once, as a timer would.
        result = engine.run("healthcheck", "run", container.name, check=False)
        assert result.returncode == 0, f"the image's HEALTHCHECK fails: {result.stdout}{result.stderr}"


def test_health_comes_within_the_bound(container: Container) -> None:
    # Measured by the fixture: from `run` to the first 200 on /health.
    print(f"container healthy after {container.startup_s:.1f} s")
    assert container.startup_s < HEALTH_TIMEOUT_S
    assert httpx.get(container.base_url + "/health", timeout=10).status_code == 200


def test_completion_and_streamed_chat(container: Container) -> None:
    with httpx.Client(base_url=container.base_url, timeout=60) as client:
        reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True,
                                                     "temperature": 0})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] == 5 and body["choices"][0]["finish_reason"] == "length"

        request = {"messages": [{"role": "user", "content": "Hi!"}], "stream": True, "max_tokens": 6,
                   "ignore_eos": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=request) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = list(iter_sse(stream))
    assert events[-1] == DONE
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_metrics_count_the_generated_tokens(container: Container) -> None:
    def generated() -> float:
        text = httpx.get(container.base_url + "/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("customllm_generation_tokens_total")]
        assert lines, "no customllm_generation_tokens_total on /metrics"
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = generated()
    reply = httpx.post(container.base_url + "/v1/completions",
                       json={"prompt": "Count", "max_tokens": 4, "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200
    assert generated() == before + 4


def test_server_runs_as_a_non_root_user(engine: Engine, container: Container) -> None:
    (info,) = engine.inspect(container.name)
    assert info["Config"]["User"] == "customllm"
    status = engine.run("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(USER_UID)] * 4, status


def test_the_read_only_mounted_checkpoint_is_served(engine: Engine, container: Container) -> None:
    (model,) = httpx.get(container.base_url + "/v1/models", timeout=10).json()["data"]
    # The seed architecture would report its own, larger context; this is the tiny checkpoint's.
    assert model["max_model_len"] == TINY_SERVE.max_position_embeddings
    metrics = httpx.get(container.base_url + "/metrics", timeout=10).text
    assert 'model="/models/tiny"' in metrics, "customllm_model_info does not name the mounted checkpoint"
    # Even root inside the container cannot write to the mount.
    result = engine.run("exec", "--user", "0", container.name, "touch", "/models/tiny/probe", check=False)
    assert result.returncode != 0 and "read-only" in (result.stdout + result.stderr).lower(), result


def test_the_runtime_stage_has_no_compiler(engine: Engine, container: Container) -> None:
    found = engine.run("exec", container.name, "sh", "-c", "command -v gcc g++ cc c++ || true").stdout
    assert found.strip() == "", f"compilers in the runtime image: {found}"


def test_the_container_logs_its_backends(engine: Engine, container: Container) -> None:
    """Which fast path runs is logged once at load; on a CPU the extension supports (AVX2 and up), the image's
    prebuilt extension runs, not the torch fallback (the runtime stage has no compiler to build one)."""
    logs = _logs(engine, container.name)
    # The start-up table: "backends for cpu <dtype>:", then one "  <op>  <backend>  <why>" line per op.
    assert re.search(r"backends for cpu [\w.]+:", logs), logs
    backends = dict(re.findall(r"^ +(linear|MLA decode|MoE experts) {2,}(\S+) ", logs, re.M))
    print(f"backends in the container: {backends}")
    assert {"linear", "MLA decode", "MoE experts"} <= set(backends), logs
    assert "CPU extension" in logs, logs
    if cpu_extension.detect_isa() is not None:
        assert "CPU extension loaded" in logs, logs
        assert backends["MLA decode"] == "cpp" and backends["MoE experts"] == "cpp", backends


def test_sigterm_drains_the_stream_in_flight_and_exits_zero(engine: Engine, container: Container) -> None:
    """Last in the module: it stops the container."""
    events: list[str] = []
    first_chunk = threading.Event()

    def stream() -> None:
        request = {"prompt": "Drain", "max_tokens": 30, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", container.base_url + "/v1/completions", json=request, timeout=60) as reply:
            for event in iter_sse(reply):
                events.append(event)
                first_chunk.set()

    client = threading.Thread(target=stream)
    client.start()
    assert first_chunk.wait(30), "the stream sent nothing"
    signalled = time.monotonic()
    engine.run("kill", "--signal", "TERM", container.name)
    code = engine.run("wait", container.name, timeout=SHUTDOWN_TIMEOUT_S + 60).stdout.strip()
    took = time.monotonic() - signalled
    client.join(timeout=30)
    logs = _logs(engine, container.name)
    assert code == "0", f"exit status {code} after SIGTERM:\n{logs}"
    assert took < SHUTDOWN_TIMEOUT_S + 15, f"took {took:.1f} s to stop"
    # The request in flight finished whole: 30 tokens, then [DONE].
    assert events and events[-1] == DONE, events[-3:]
    finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] == "length"
    assert not _running(engine, container.name)
