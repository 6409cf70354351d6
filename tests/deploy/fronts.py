"""The two fronts the scale-out tests put before the replicas: vllm-router (from PyPI) and Debian's HAProxy,
each started from the flags and files under deploy/."""

from __future__ import annotations

import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from bench.local_server import free_port
from tests.deploy.cluster import ROOT, Cluster, Proc, healthy, spawn, wait_until

VALUES = ROOT / "deploy" / "helm" / "customllm" / "values.yaml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
VLLM_ROUTER = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or shutil.which("vllm-router")
HAPROXY = shutil.which("haproxy")


def router_args() -> list[str]:
    """The router's flags as the Helm chart runs it (values.yaml router.args)."""
    return [str(a) for a in yaml.safe_load(VALUES.read_text())["router"]["args"]]


@dataclass
class Front:
    proc: Proc
    url: str
    metrics_url: str
    socket_path: Path | None = None

    def admin(self, command: str) -> str:
        """One command on HAProxy's runtime API."""
        assert self.socket_path is not None, "only HAProxy has a runtime API"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()


@contextmanager
def vllm_router(cluster: Cluster, extra: tuple[str, ...] = ()) -> Iterator[Front]:
    assert VLLM_ROUTER is not None, "vllm-router is not installed (it is in the dev extras)"
    port, prom_port = free_port(), free_port()
    # Tests shorten the health checks so a dead replica leaves the rotation within a second or two.
    cmd = [VLLM_ROUTER, "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
           *[r.url for r in cluster.replicas], *router_args(), "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(prom_port), "--health-check-interval-secs", "1",
           "--worker-startup-check-interval", "1", *extra]
    proc = spawn("vllm-router", cmd, f"http://127.0.0.1:{port}", cluster.tmp)
    try:
        wait_until(lambda: httpx.get(proc.url + "/v1/models", timeout=2).status_code == 200, 60,
                   "the router to serve", [proc])
        yield Front(proc, proc.url, f"http://127.0.0.1:{prom_port}")
    finally:
        proc.stop()


@contextmanager
def haproxy(cluster: Cluster) -> Iterator[Front]:
    assert HAPROXY is not None, "haproxy is not installed (.ci/run installs Debian's package)"
    assert len(cluster.replicas) == 3, "deploy/haproxy/haproxy.cfg names three replicas"
    port, stats_port = free_port(), free_port()
    sock = cluster.tmp / "haproxy.sock"
    env = {"HAPROXY_BIND": f"127.0.0.1:{port}", "HAPROXY_STATS_BIND": f"127.0.0.1:{stats_port}",
           "HAPROXY_SOCKET": str(sock)}
    env |= {f"REPLICA{i}": r.url.removeprefix("http://") for i, r in enumerate(cluster.replicas)}
    proc = spawn("haproxy", [HAPROXY, "-db", "-f", str(HAPROXY_CFG)], f"http://127.0.0.1:{port}", cluster.tmp, env)
    front = Front(proc, proc.url, f"http://127.0.0.1:{stats_port}", sock)
    try:
        def all_up() -> bool:
            rows = [line for line in front.admin("show stat").splitlines() if line.startswith("replicas,replica")]
            return len(rows) == 3 and all(",UP," in row for row in rows)

        wait_until(lambda: healthy(front.url) and all_up(), 30,
                   "haproxy to see three healthy replicas", [proc])
        yield front
    finally:
        proc.stop()
