"""Keeps the packaging honest without a Docker engine: the Dockerfile against the Makefile's installs, .ci/run,
pyproject's dependencies and the wheel's contents."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


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


def test_gpu_override_reserves_a_gpu_and_builds_on_a_cuda_base() -> None:
    server = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    args = server["build"]["args"]
    assert "cuda" in args["BASE_IMAGE"]
    dockerfile_args = _dockerfile_args(_dockerfile_lines())
    undeclared = set(args) - set(dockerfile_args)
    assert not undeclared, f"the GPU override passes build args the Dockerfile does not declare: {undeclared}"


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
    assert {"prometheus", "podman", "runc", "catatonit", "debootstrap", "chromium"} <= set(packages.group(1).split())
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
        # The playground's page, stylesheet and scripts (package data, not modules).
        static = {p.relative_to(src).as_posix() for p in (src / "server" / "playground" / "static").iterdir()}
        assert {"server/playground/static/index.html", "server/playground/static/main.js"} <= static <= names
        # Every module of the tree, subpackages included (a non-editable install has nothing else).
        modules = {p.relative_to(src).as_posix() for package in ("model", "server")
                   for p in (src / package).rglob("*.py")}
        assert modules and modules <= names, f"the wheel lacks {sorted(modules - names)[:5]}"
        sources = {p.relative_to(src).as_posix() for p in (src / "model" / "csrc").glob("*.[ch]*")}
        assert sources <= names, f"the wheel lacks the CPU extension's sources {sorted(sources - names)}"
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "customllm-server = server.cli:main" in zf.read(entry_points).decode()
        assert any(n.endswith("licenses/NOTICE") for n in names)
