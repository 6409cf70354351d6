"""The compose stack: docker-compose.yml with docker-compose.test.yml (local images, a tiny checkpoint).

Prometheus scrapes `server:8000` over the compose network (by service name), the way the stack runs for
users; the test reaches both containers at their addresses on that network. Grafana's image cannot be had
here: its provisioning and dashboard are checked by tests/test_packaging.py and tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.image.engine import PROMETHEUS_IMAGE, ROOT, SERVER_IMAGE, Engine

PROJECT = f"customllm-test-{os.getpid()}"
COMPOSE_FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.test.yml")]
STACK_TIMEOUT_S = 180
T = TypeVar("T")


@dataclass(frozen=True)
class Stack:
    server_url: str
    prometheus_url: str


def _compose(engine: Engine) -> list[str]:
    command = engine.compose_command()
    if command is None:
        tool = "podman-compose (pip install podman-compose)" if engine.name == "podman" else "docker compose"
        if os.environ.get("CUSTOMLLM_REQUIRE_CONTAINERS") == "1":
            pytest.fail(f"{tool} is required here but not installed")
        pytest.skip(f"{tool} is not installed")
    return command


def _run(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n" \
                                   f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _project_containers(engine: Engine) -> list[str]:
    label = "io.podman.compose.project" if engine.name == "podman" else "com.docker.compose.project"
    out = engine.run("ps", "-a", "--filter", f"label={label}={PROJECT}", "--format", "{{.Names}}").stdout
    return out.split()


def _address(engine: Engine, service: str) -> str:
    """The service's container address on the compose network."""
    (name,) = [n for n in _project_containers(engine) if f"_{service}_" in n or f"-{service}-" in n]
    networks = engine.inspect(name)[0]["NetworkSettings"]["Networks"]
    (network,) = networks.values()
    return str(network["IPAddress"])


def _prometheus_value(url: str, query: str) -> float | None:
    try:
        reply = httpx.get(url + "/api/v1/query", params={"query": query}, timeout=5)
    except httpx.TransportError:
        return None
    result = reply.json()["data"]["result"]
    return sum(float(r["value"][1]) for r in result) if result else None


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float = STACK_TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def stack(engine: Engine, server_image: str, prometheus_image: str, models_dir: Path) -> Iterator[Stack]:
    compose = [*_compose(engine), "-p", PROJECT, *COMPOSE_FILES]
    env = dict(engine.env, CUSTOMLLM_MODELS_DIR=str(models_dir), CUSTOMLLM_SERVER_IMAGE=server_image,
               CUSTOMLLM_PROMETHEUS_IMAGE=prometheus_image)
    assert server_image == SERVER_IMAGE and prometheus_image == PROMETHEUS_IMAGE
    _run([*compose, "up", "-d"], env)
    try:
        server = f"http://{_address(engine, 'server')}:8000"
        prometheus = f"http://{_address(engine, 'prometheus')}:9090"

        def healthy() -> bool | None:
            try:
                return httpx.get(server + "/health", timeout=5).status_code == 200 or None
            except httpx.TransportError:
                return None

        _wait_for("the server's /health", healthy)
        yield Stack(server, prometheus)
    finally:
        _run([*compose, "down"], env)
        left = _project_containers(engine)
        assert not left, f"compose down left containers behind: {left}"


def test_prometheus_scrapes_the_server_over_the_compose_network(stack: Stack) -> None:
    def scraped() -> float | None:
        # A scrape before the server listened leaves up = 0; wait for a successful one (every 5 s).
        value = _prometheus_value(stack.prometheus_url, 'up{instance="server:8000"}')
        return value if value == 1.0 else None

    try:
        _wait_for("Prometheus to scrape server:8000 (up = 1)", scraped, timeout=90)
    except AssertionError as exc:
        targets = httpx.get(stack.prometheus_url + "/api/v1/targets", timeout=5).json()
        raise AssertionError(f"{exc}; targets: {targets['data']['activeTargets']}") from None
    query = "customllm_generation_tokens_total"
    before = _wait_for("a first sample of the token counter", lambda: _prometheus_value(stack.prometheus_url, query))
    reply = httpx.post(stack.server_url + "/v1/completions",
                       json={"prompt": "Scrape me", "max_tokens": 7, "ignore_eos": True}, timeout=60)
    assert reply.status_code == 200, reply.text

    def moved() -> float | None:
        value = _prometheus_value(stack.prometheus_url, query)
        return value if value is not None and value > before else None

    assert _wait_for("the counter to move", moved, timeout=60) == before + 7


def test_the_gpu_override_parses(engine: Engine) -> None:
    compose = _compose(engine)
    env = dict(engine.env, CUSTOMLLM_MODELS_DIR="/nonexistent")
    out = _run([*compose, "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.gpu.yml"),
                "config"], env, timeout=60)
    assert "nvidia" in out and "customllm-server:cuda" in out and "nvidia/cuda" in out, out
