"""Real processes on 127.0.0.1 for the scale-out tests: N tiny replicas (`python -m server`), and a front
(vllm-router or HAProxy) started from the files under deploy/. Everything started here is stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.local_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s; never leaves the process behind."""
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait(timeout=30)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on `url`/metrics, parsed with prometheus-client's parser (it raises on malformed text)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url: str, name: str) -> float:
    """The sum of the samples called `name` (all label sets)."""
    return sum(v for (n, _), v in metrics(url).items() if n == name)


def wait_until(check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.alive(), f"{p.name} exited ({p.popen.returncode}) while waiting for {what}:\n{p.tail()}"
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def healthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=2).status_code == 200


@dataclass
class Cluster:
    replicas: list[Proc]
    tmp: Path
    stack: ExitStack = field(default_factory=ExitStack)

    def by_url(self, url: str) -> Proc:
        return next(r for r in self.replicas if r.url == url)

    def restart(self, proc: Proc, wait: bool = True) -> None:
        """Start a stopped replica again on its own port (the fronts know it by address)."""
        proc.stop()
        new = spawn(proc.name, proc.cmd, proc.url, self.tmp, proc.env)
        self.replicas[self.replicas.index(proc)] = new
        if wait:
            wait_until(lambda: healthy(new.url), 120, f"{new.name} to be healthy again", [new])

    def served(self) -> dict[str, float]:
        """Finished requests per live replica, from its own vllm:request_success_total."""
        return {r.url: metric(r.url, "vllm:request_success_total") for r in self.replicas if r.alive()}


def spawn(name: str, cmd: list[str], url: str, tmp: Path, env: dict[str, str] | None = None) -> Proc:
    log = tmp / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=(os.environ | (env or {})), start_new_session=True)
    return Proc(name, url, popen, log, cmd, env or {})


@contextmanager
def replicas(checkpoint: Path, tmp: Path, n: int = 3, extra_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """`n` replicas started at once (start-up overlaps), each healthy before the block runs."""
    procs: list[Proc] = []
    cluster: Cluster | None = None
    # One torch thread each: three replicas on a 2-core machine would otherwise oversubscribe it many times over.
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        for i in range(n):
            port = free_port()
            cmd = [sys.executable, "-m", "server", "--model", str(checkpoint), "--port", str(port),
                   "--dtype", "float32", "--device", "cpu", "--kv-cache-tokens", "8192", "--max-num-seqs", "16",
                   "--shutdown-timeout", "60", "--log-level", "warning", *extra_args]
            procs.append(spawn(f"replica{i}", cmd, f"http://127.0.0.1:{port}", tmp, env))
        for p in procs:
            wait_until(lambda p=p: healthy(p.url), 120, f"{p.name} to be healthy", [p])
        cluster = Cluster(procs, tmp)
        yield cluster
    finally:
        for p in cluster.replicas if cluster is not None else procs:
            p.stop()


def sigterm(proc: Proc) -> None:
    proc.signal(signal.SIGTERM)


def sigkill(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
