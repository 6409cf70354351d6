"""The replicas compose overlay agrees with the HAProxy config and its Prometheus config (no Docker engine here:
the files are checked against each other, and haproxy -c checks the config with the overlay's environment)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_overlay_replicas_haproxy_and_prometheus_agree() -> None:
    overlay = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    services = overlay["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert replicas == ["replica-1", "replica-2", "replica-3"]
    env = services["haproxy"]["environment"]
    assert sorted(v for k, v in env.items() if k.startswith("REPLICA")) == [f"{r}:8000" for r in replicas]
    for name in replicas:
        grace = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert grace > float(services[name]["environment"]["CUSTOMLLM_SHUTDOWN_TIMEOUT"])
    (mount,) = services["prometheus"]["volumes"]
    prom = yaml.safe_load((ROOT / mount.split(":")[0].removeprefix("./")).read_text())
    targets = {t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {f"{r}:8000" for r in replicas} | {"server:8000", env["HAPROXY_STATS_BIND"].replace("0.0.0.0", "haproxy")} \
        == targets
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    # The same environment as the container, with names that resolve here.
    check_env = {k: (v.replace("replica-", "127.0.0.") if k.startswith("REPLICA") else v) for k, v in env.items()}
    result = subprocess.run([haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                            env=check_env | {"HAPROXY_SOCKET": "/tmp/customllm-haproxy-check.sock"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
