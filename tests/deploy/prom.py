"""A real Prometheus on 127.0.0.1 scraping a list of targets once, for the scale-out tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from bench.local_server import free_port


def scrape_all(targets: list[str], query: str, tmp: Path, timeout: float = 60) -> tuple[dict[str, float], int] | None:
    """(`up` per target instance, number of series `query` returns) once every target was scraped; None when
    the prometheus binary is absent."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    instances = [t.removeprefix("http://") for t in targets]
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": "scaleout", "static_configs": [{"targets": instances}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, "prometheus exited"
            try:
                up = {r["metric"]["instance"]: float(r["value"][1])
                      for r in httpx.get(api, params={"query": "up"}, timeout=5).json()["data"]["result"]}
                if len(up) == len(instances) and all(v == 1 for v in up.values()):
                    series = httpx.get(api, params={"query": query}, timeout=5).json()["data"]["result"]
                    return up, len(series)
            except (httpx.TransportError, ValueError):  # not listening yet, or not yet serving its API (no JSON)
                pass
            assert time.monotonic() < deadline, f"prometheus did not scrape all of {instances}"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
