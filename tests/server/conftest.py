"""Module-scoped fixtures of the HTTP tests: one live tiny server per test module (a module may override
`server` with its own settings), and clients for it."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.tokenizer import Tokenizer, load_tokenizer
from tests.server.live import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)
