"""A throw-away server on 127.0.0.1 for the soak and fuzz scripts' `--start-server`: a subprocess of
`python -m server`, serving a given checkpoint or a tiny random one written to a temporary directory. Also the
helpers that wait for a server and stop its process group, shared with the peer benchmark (bench/peer*.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

# The bundled tokenizer's vocabulary, everything else tiny: a step takes milliseconds on a CPU.
TINY_CONFIG = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, latent_dim=16,
                   intermediate_size=64, num_experts=4, num_shared_experts=1, top_k_experts=2,
                   max_position_embeddings=512)


@dataclass
class LocalServer:
    url: str
    pid: int


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors of TINY_CONFIG with seeded random weights."""
    import torch
    from safetensors.torch import save_file

    from model import ModelConfig, load_checkpoint

    config = ModelConfig.from_dict(TINY_CONFIG)
    model = load_checkpoint(None, dtype=torch.float32, config=config, seed=seed)  # unprocessed: its state dict saves
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, interval: float = 0.5) -> None:
    """Poll `url`/health until it answers 200. RuntimeError if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} during start-up")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {timeout:.0f} s")
        time.sleep(interval)


def wait_started(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """wait_healthy, with the end of the server's log in the error."""
    try:
        wait_healthy(proc, url, timeout, interval=2)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}:\n{tail(log)}") from None


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (e.g. vLLM's API server, engine core and worker), then SIGKILL what remains."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    time.sleep(1)  # the group's other members exit just after the leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def local_server(model: str | None, extra_args: list[str], startup_timeout: float = 120.0) -> Iterator[LocalServer]:
    """Start `python -m server` on a free loopback port; stop it (SIGTERM, then SIGKILL) on exit."""
    with tempfile.TemporaryDirectory(prefix="customllm-bench-") as tmp:
        path = model or str(write_tiny_checkpoint(Path(tmp) / "tiny"))
        port = free_port()
        cmd = [sys.executable, "-m", "server", "--model", path, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--device", "cpu", "--log-level", "warning", *extra_args]
        # This checkout's server, whether or not the package is installed.
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        proc = subprocess.Popen(cmd, env=env)
        url = f"http://127.0.0.1:{port}"
        # A SIGTERM to this script must still stop the server: turn it into SystemExit so `finally` runs.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            try:
                wait_healthy(proc, url, startup_timeout, interval=0.2)
            except RuntimeError as exc:
                raise RuntimeError(f"server {exc}: {cmd}") from None
            yield LocalServer(url, proc.pid)
        finally:
            signal.signal(signal.SIGTERM, previous)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
