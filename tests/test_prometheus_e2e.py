"""A real Prometheus scrapes a real test server, with a config derived from docker/prometheus.yml."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server.live import free_port, live_server

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="the prometheus binary is not installed (.ci/run installs Debian's package)")


def loopback_config(server_port: int) -> dict:
    """docker/prometheus.yml with its server target moved to 127.0.0.1 and a fast scrape."""
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == ["server:8000"], "the compose config must scrape the server service"
    static["targets"] = [f"127.0.0.1:{server_port}"]
    config["global"]["scrape_interval"] = "1s"
    return config


def test_prometheus_scrapes_the_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert PROMETHEUS is not None, "prometheus must be installed in CI"
    with live_server(tiny_checkpoint) as server:
        with server.client() as client:
            reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
            assert reply.status_code == 200
        port = int(server.base_url.rsplit(":", 1)[1])
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(loopback_config(port)))
        prom_port = free_port()
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            value = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and value is None:
                time.sleep(0.5)
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "prometheus exited"
                try:
                    reply = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query",
                                      params={"query": "customllm_generation_tokens_total"}, timeout=5)
                except httpx.TransportError:
                    continue
                result = reply.json()["data"]["result"]
                if result:
                    value = float(result[0]["value"][1])
            assert value == 5.0
            targets = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/targets", timeout=5).json()
            assert [t["health"] for t in targets["data"]["activeTargets"]] == ["up"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_dashboard_queries_name_only_exported_metrics(tiny_checkpoint: Path) -> None:
    """Every customllm_* name in the Grafana dashboard is on a live server's /metrics after one request."""
    dashboard = (ROOT / "docker" / "grafana" / "dashboards" / "customllm.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p.get("targets", []) if "expr" in t]
    assert exprs
    used = {m for e in exprs for m in re.findall(r"customllm_[a-z0-9_]+", e)}
    with live_server(tiny_checkpoint) as server, server.client() as client:
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200
        text = client.get("/metrics").text
    exported = set(re.findall(r"^(customllm_[a-z0-9_]+)", text, re.MULTILINE))
    assert used <= exported, f"dashboard uses metrics the server does not export: {sorted(used - exported)}"
