"""A real server for tests: a tiny checkpoint on disk, the app from server.cli's pieces, uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from safetensors.torch import save_file

from bench.local_server import free_port
from model import ModelConfig
from server.metrics import ServerMetrics
from server.openai.api import ServerSettings, create_app
from server.openai.chat_template import ChatTemplate
from server.startup import build_engine
from server.tokenizer import load_tokenizer
from tests.model.conftest import random_state

# The real tokenizer's vocabulary, everything else tiny: a real model that runs a step in milliseconds.
TINY_SERVE = ModelConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         latent_dim=16, intermediate_size=64, num_experts=4, num_shared_experts=1,
                         top_k_experts=2, max_position_embeddings=512)


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A checkpoint directory (config.json + model.safetensors) of TINY_SERVE with random weights."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(random_state(TINY_SERVE, seed), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(TINY_SERVE.to_dict()))
    return directory


class LiveServer:
    def __init__(self, base_url: str, app, engine, server: uvicorn.Server) -> None:
        self.base_url = base_url
        self.app = app
        self.engine = engine
        self.server = server

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample on /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total


@contextmanager
def live_server(checkpoint: Path, settings: ServerSettings | None = None, chat_template: ChatTemplate | None = None,
                **engine_kwargs) -> Iterator[LiveServer]:
    """Serve `checkpoint` on 127.0.0.1 in this process until the block exits."""
    metrics = ServerMetrics()
    kwargs = dict(dtype="float32", device="cpu", kv_cache_tokens="4096", max_num_seqs=16,
                  max_num_batched_tokens=256) | engine_kwargs
    tokenizer = load_tokenizer(None)
    engine = build_engine(str(checkpoint), eos_token_id=tokenizer.eos_token_id, metrics=metrics, **kwargs)
    app = create_app(engine, tokenizer, settings or ServerSettings(), metrics, chat_template)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, engine, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def engine_held_after(server: LiveServer, num_steps: int) -> Iterator[threading.Event]:
    """Model steps after the engine's next `num_steps` wait until the yielded event is set (or the block ends), so a
    test sees its request in flight however fast this machine generates. Aborts and new requests queue meanwhile."""
    release, execute = threading.Event(), server.engine.runner.execute
    calls = 0

    def held(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls > num_steps:
            assert release.wait(60), "the test never released the engine"
        return execute(*args, **kwargs)

    server.engine.runner.execute = held
    try:
        yield release
    finally:
        release.set()
        del server.engine.runner.execute  # the instance attribute goes: the method is the class's again

