"""--disable-playground: GET / and the playground's files answer 404 in the OpenAI error shape; the API stays."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import build_parser
from server.openai.api import ServerSettings
from tests.server.live import LiveServer, live_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, ServerSettings(enable_playground=False)) as live:
        yield live


def test_a_disabled_playground_is_a_404_in_the_openai_shape(server: LiveServer) -> None:
    with server.client() as http:
        for path in ("/", "/playground", "/playground/main.js"):
            reply = http.get(path)
            assert reply.status_code == 404, path
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
            assert reply.json()["error"]["type"] == "NotFoundError"
        assert http.get("/v1/models").status_code == 200


def test_the_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_parser().parse_args([]).disable_playground is False
    assert build_parser().parse_args(["--disable-playground"]).disable_playground is True
    assert build_parser().parse_args(["--disable-playground", "false"]).disable_playground is False
    monkeypatch.setenv("CUSTOMLLM_DISABLE_PLAYGROUND", "true")
    assert build_parser().parse_args([]).disable_playground is True
