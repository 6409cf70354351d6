"""The container engine the image tests drive: rootful podman with the project's settings, or a docker daemon.

`find_engine()` answers an Engine, or the reason why containers cannot run here (the tests skip with it).
Podman gets its settings from docker/podman/ (env.sh: CONTAINERS_CONF, CONTAINERS_STORAGE_CONF) and builds
through docker/podman/build.sh, which makes the base image locally and passes the host's pip configuration in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PODMAN_DIR = ROOT / "docker" / "podman"
SERVER_IMAGE = "localhost/customllm-server:test"
PROMETHEUS_IMAGE = "localhost/customllm-prometheus:test"
# One image build may take minutes on a loaded 2-core machine (measured: ~3 min with a warm pip, more cold).
BUILD_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Engine:
    name: str  # "podman" or "docker"
    binary: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`podman ARGS` (or docker), output captured; a failure raises with both streams in the message."""
        result = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def inspect(self, *names: str, kind: str = "container") -> list[dict[str, Any]]:
        return json.loads(self.run(kind, "inspect", *names).stdout)

    def build(self, tag: str, context: Path) -> None:
        """Build `context` (its Dockerfile) as `tag`; output goes to the test's log on failure."""
        if self.name == "podman":
            command = ["bash", str(PODMAN_DIR / "build.sh"), tag, str(context)]
        else:
            command = [self.binary, "build", "-t", tag, str(context)]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise AssertionError(f"building {tag} from {context} failed ({result.returncode}):\n"
                                 f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")

    def compose_command(self) -> list[str] | None:
        """podman-compose (PyPI) for podman, `docker compose` for docker; None when it is not installed."""
        if self.name == "podman":
            found = shutil.which("podman-compose") or _beside_python("podman-compose")
            return [found] if found else None
        probe = subprocess.run([self.binary, "compose", "version"], env=self.env, capture_output=True, timeout=30)
        return [self.binary, "compose"] if probe.returncode == 0 else None


def _beside_python(name: str) -> str | None:
    """A console script of the running interpreter's environment (a venv not on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


def podman_env() -> dict[str, str]:
    """os.environ plus what docker/podman/env.sh exports (the same choice of storage driver as the scripts)."""
    script = f". {PODMAN_DIR / 'env.sh'} && printf '%s\\n%s\\n' \"$CONTAINERS_CONF\" \"$CONTAINERS_STORAGE_CONF\""
    conf, storage = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                                   timeout=30).stdout.split()
    env = dict(os.environ, CONTAINERS_CONF=conf, CONTAINERS_STORAGE_CONF=storage)
    # build.sh reads the pip configuration of this interpreter's pip (the venv's, which CI sets up).
    pip = _beside_python("pip")
    if pip and "PIP" not in env:
        env["PIP"] = pip
    return env


def find_engine() -> Engine | str:
    """An engine that can build and run containers here, or the reason why there is none."""
    reasons = []
    podman = shutil.which("podman")
    if podman is None:
        reasons.append("podman is not installed (.ci/run installs Debian's podman, runc, catatonit, debootstrap)")
    elif os.geteuid() != 0:
        reasons.append("podman is installed, but the settings in docker/podman/ are for rootful podman "
                       "and this is not root")
    elif shutil.which("debootstrap") is None:
        reasons.append("podman is installed but debootstrap, which makes the base image, is not")
    else:
        env = podman_env()
        info = subprocess.run([podman, "info"], env=env, capture_output=True, text=True, timeout=120)
        if info.returncode == 0:
            return Engine("podman", podman, env)
        reasons.append(f"podman info failed: {info.stderr.strip()[-500:]}")
    docker = shutil.which("docker")
    if docker is not None:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return Engine("docker", docker, dict(os.environ))
        reasons.append("docker is installed but no daemon answers")
    return "; ".join(reasons)
