"""Keeps the monitoring stack honest without a Docker engine: compose services, Prometheus's scrape config,
Grafana's provisioning and every dashboard query against the metrics the server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import ServerMetrics
from tests.server.metrics_utils import finished_stats, step_stats

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "customllm.json"
# The one mount whose source is the user's own data, not part of the repository (Docker creates it).
USER_DATA_MOUNTS = {"./models"}
METRIC_NAME = re.compile(r"customllm_[a-z0-9_]+")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            # ${VAR:-default}: what compose mounts when VAR is unset.
            source, target = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", volume).split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _exported_metric_names() -> set[str]:
    """Sample names a ServerMetrics exports once each kind of observation has happened."""
    metrics = ServerMetrics()
    metrics.set_info(model="m", dtype="float32", device="cpu")
    metrics.set_kv_cache_info(bytes_per_token=1, capacity_tokens=1)
    metrics.record_step(step_stats(4, 1, 1, 0.5, [[1, 2], [3, 4]]))
    metrics.record_finished(finished_stats("stop", 1, 2, 0.1, 0.2, 0.3))
    metrics.observe_token_latency(0.01)
    metrics.record_step(step_stats(preemptions=1))
    metrics.record_step(step_stats(prefix_queries=2, prefix_hits=1))
    metrics.observe_http("/v1/completions", 200)
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def _dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


# --- docker compose -------------------------------------------------------------------------------


def test_compose_services_and_mounted_paths_exist() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    assert services["server"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()
    assert "8000:8000" in services["server"]["ports"]
    assert ("./models", "/models") in _bind_mounts(services["server"])
    assert any(v.endswith(":ro") for v in services["server"]["volumes"] if "./models" in v)
    for name, service in services.items():
        for source, _ in _bind_mounts(service):
            if source in USER_DATA_MOUNTS:
                continue
            assert (ROOT / source).exists(), f"service {name} mounts {source}, which is not in the repo"


def test_prometheus_scrapes_the_compose_server_service() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    config = _yaml(PROMETHEUS_CONFIG)
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets, "docker/prometheus.yml scrapes nothing"
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
    server_ports = _container_ports(services["server"])
    env_port = int(services["server"]["environment"].get("CUSTOMLLM_PORT", 8000))
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host == "server" and host in services
        assert int(port) in server_ports and int(port) == env_port
    mounts = dict(_bind_mounts(services["prometheus"]))
    assert mounts["./docker/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def test_grafana_provisioning_matches_the_mounts_and_the_dashboard() -> None:
    services = _yaml(COMPOSE)["services"]
    mounts = dict(_bind_mounts(services["grafana"]))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_target = mounts["./docker/grafana/dashboards"]

    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (datasource,) = datasources
    assert datasource["type"] == "prometheus"
    prometheus_port = _container_ports(services["prometheus"]).pop()
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"

    (provider,) = _yaml(GRAFANA / "provisioning" / "dashboards" / "customllm.yml")["providers"]
    assert provider["options"]["path"] == dashboards_target

    dashboard = json.loads(DASHBOARD.read_text())
    uids = set()
    for panel in dashboard["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                uids.add(item["datasource"]["uid"])
    assert uids == {datasource["uid"]}


# --- the dashboard's PromQL -----------------------------------------------------------------------


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exported = _exported_metric_names()
    exprs = _dashboard_exprs()
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no customllm_ metric in the dashboard"
    missing = used - exported
    assert not missing, f"dashboard queries metrics that ServerMetrics does not export: {sorted(missing)}"
    # The panels the issue asks for are there.
    for needed in ("customllm_generation_tokens_total", "customllm_time_to_first_token_seconds_bucket",
                   "customllm_inter_token_latency_seconds_bucket", "customllm_num_requests_running",
                   "customllm_num_requests_waiting", "customllm_kv_cache_usage_ratio",
                   "customllm_num_preemptions_total", "customllm_moe_expert_tokens_total"):
        assert needed in used, f"the dashboard has no panel on {needed}"
    assert any("sum by (layer, expert)" in e for e in exprs), "no per-expert load panel"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool (from Debian's prometheus package) is not installed")
def test_dashboard_queries_and_prometheus_config_are_valid_for_promtool(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(_dashboard_exprs())]}]}
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    for args in (["check", "rules", str(rules_file)], ["check", "config", str(PROMETHEUS_CONFIG)]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile vs Makefile -----------------------------------------------------------------------
