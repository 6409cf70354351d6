"""Keeps the packaging honest without a Docker engine: compose, Prometheus, Grafana, Dockerfile, pyproject."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import ServerMetrics
from tests.server.metrics_utils import finished_stats, step_stats

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
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


def test_gpu_override_reserves_a_gpu_and_builds_on_a_cuda_base() -> None:
    server = _yaml(COMPOSE_GPU)["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    args = server["build"]["args"]
    assert "cuda" in args["BASE_IMAGE"]
    dockerfile_args = _dockerfile_args(_dockerfile_lines())
    undeclared = set(args) - set(dockerfile_args)
    assert not undeclared, f"the GPU override passes build args the Dockerfile does not declare: {undeclared}"


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


def _dockerfile_lines() -> list[str]:
    """Instructions with their continuation lines joined."""
    joined, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return joined


def _dockerfile_args(lines: list[str]) -> dict[str, str]:
    args = {}
    for line in lines:
        if line.startswith("ARG "):
            name, _, default = line[4:].partition("=")
            args[name.strip()] = default.strip()
    return args


def _expand(text: str, env: dict[str, str]) -> str:
    """The shell's ${X:+word}, ${X} and $X, enough for our RUN lines."""
    text = re.sub(r"\$\{(\w+):\+([^}]*)\}", lambda m: m.group(2) if env.get(m.group(1)) else "", text)
    text = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), text)
    return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), text)


_PIP_OPTIONS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "-c",
                           "--constraint"}


def _pip_install_specs(command: str) -> list[list[str]]:
    """The requirement specs of each `pip install` in a shell command, options dropped."""
    installs = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if len(words) < 2 or not words[0].endswith("pip") or words[1] != "install":
            continue
        specs, skip = [], False
        for word in words[2:]:
            if skip:
                skip = False
            elif word in _PIP_OPTIONS_WITH_VALUE:
                skip = True
            elif not word.startswith("-"):
                specs.append(word)
        installs.append(specs)
    return installs


def _makefile_installs() -> list[list[str]]:
    """pip installs of the Makefile's install recipe (the $(STAMP) target that every other target depends on)."""
    installs = []
    in_recipe = False
    for line in (ROOT / "Makefile").read_text().splitlines():
        if not line.startswith("\t"):
            in_recipe = line.startswith("$(STAMP):")
        elif in_recipe and "pip install" in line:
            installs += _pip_install_specs(line.replace("$(BIN)/", ""))
    return installs


def _dockerfile_installs() -> list[list[str]]:
    lines = _dockerfile_lines()
    env = _dockerfile_args(lines)
    installs = []
    for line in lines:
        if line.startswith("RUN ") and "pip install" in line:
            installs += _pip_install_specs(_expand(line[4:], env))
    return installs


def _is_this_project(spec: str) -> bool:
    return re.fullmatch(r"\.(/src)?(\[[\w,]+\])?", spec) is not None


def test_dockerfile_installs_the_same_way_as_the_makefile() -> None:
    make, docker = _makefile_installs(), _dockerfile_installs()
    assert make == [["torch==2.13.0"], [".[dev]"]], make
    assert len(docker) == 2, docker
    # torch pinned, first, and alone, in both: the same pin is what keeps pip off a CUDA build.
    assert docker[0] == make[0]
    (project,) = docker[1]
    assert _is_this_project(project), docker


def test_dockerfile_image_contract() -> None:
    lines = _dockerfile_lines()
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) >= 2, "not a multi-stage build"
    assert _dockerfile_args(lines)["BASE_IMAGE"] == "python:3.11-slim"
    text = "\n".join(lines)
    assert "USER customllm" in text
    assert "CUSTOMLLM_HOST=0.0.0.0" in text and "CUSTOMLLM_PORT=8000" in text
    assert "VOLUME /models" in text and "EXPOSE 8000" in text
    (healthcheck,) = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert "/health" in healthcheck
    assert 'ENTRYPOINT ["customllm-server"]' in text
    # Every path the builder copies exists, and the runtime user is set after the copies.
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert text.index("USER customllm") > text.rindex("COPY ")


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "LICENSE", "NOTICE", "model/", "server/"):
        assert f"!{needed}" in patterns


def test_ci_runs_the_makefile_test_command() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands[0] == "set -euo pipefail"
    assert commands[-1] == "make test"
    assert any("apt-get" in line and " install " in line for line in lines)
    # The Debian packages it installs: Prometheus for the scrape test, podman and its helpers for tests/image/.
    packages = re.search(r'packages="([^"]*)"', (ROOT / ".ci" / "run").read_text())
    assert packages, "no package list in .ci/run"
    assert {"prometheus", "podman", "runc", "catatonit", "debootstrap"} <= set(packages.group(1).split())
    readme = ROOT / "README.md"
    if readme.exists():
        assert "make test" in readme.read_text(), "README's test command differs from .ci/run's"


# --- pyproject and the wheel ----------------------------------------------------------------------


def test_pyproject_declares_script_package_data_and_dependencies() -> None:
    project_file = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = project_file["project"]
    assert project["name"] == "customllm-server"
    assert project["scripts"]["customllm-server"] == "server.cli:main"
    setuptools_cfg = project_file["tool"]["setuptools"]
    assert set(setuptools_cfg["packages"]["find"]["include"]) == {"model", "model.*", "server", "server.*"}
    assert "tokenizer.json" in setuptools_cfg["package-data"]["server"]
    deps = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower(): d for d in project["dependencies"]}
    # A hard torch pin would fight the CUDA build a GPU user installs; the Makefile pins instead.
    assert deps["torch"].startswith("torch>=") and "==" not in deps["torch"]
    for name, spec in deps.items():
        assert re.search(r"[<>=]", spec), f"dependency {name} has no version bound"
    dev = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert {"pytest", "openai", "ruff", "mypy", "httpx", "pyyaml"} <= dev
    assert project_file["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_notice_credits_the_bundled_tokenizer() -> None:
    notice = (ROOT / "NOTICE").read_text()
    assert "server/tokenizer.json" in notice and "SmolLM2" in notice and "Apache" in notice
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def test_wheel_carries_tokenizer_console_script_and_notice(tmp_path: Path) -> None:
    """Build from exactly what the Dockerfile copies, then look inside the wheel."""
    if not (ROOT / "server" / "tokenizer.json").exists():
        pytest.fail("server/tokenizer.json is missing")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("model", "server"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("customllm_server-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "server/tokenizer.json" in names
        # Every module of the tree, subpackages included (a non-editable install has nothing else).
        modules = {p.relative_to(src).as_posix() for package in ("model", "server")
                   for p in (src / package).rglob("*.py")}
        assert modules and modules <= names, f"the wheel lacks {sorted(modules - names)[:5]}"
        sources = {p.relative_to(src).as_posix() for p in (src / "model" / "csrc").glob("*.[ch]*")}
        assert sources <= names, f"the wheel lacks the CPU extension's sources {sorted(sources - names)}"
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "customllm-server = server.cli:main" in zf.read(entry_points).decode()
        assert any(n.endswith("licenses/NOTICE") for n in names)
