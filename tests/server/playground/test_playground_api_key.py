"""The playground against a server started with --api-key: the page itself loads (it is static), the API refuses it
until the key is typed, then the key goes as a Bearer token and the chat works."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.openai.api import ServerSettings
from tests.server.live import LiveServer, live_server
from tests.server.playground.browser import PageWatch, expect, fill

KEY = "open-sesame"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    with live_server(tiny_checkpoint, ServerSettings(api_key=KEY)) as live:
        yield live


def test_the_api_key_field_is_sent_as_a_bearer_token(page: tuple[Any, PageWatch]) -> None:
    page, _ = page
    expect(page.locator("#model-name")).to_contain_text("Invalid or missing API key")
    fill(page, seed=1, max_tokens=4)
    page.fill("#chat-input", "Let me in")
    page.click("#chat-send")
    expect(page.locator("#error-message")).to_contain_text("Invalid or missing API key")
    expect(page.locator("#error-status")).to_have_text("401 AuthenticationError")

    fill(page, api_key=KEY)
    page.locator("#api-key").press("Tab")  # the change event reloads the model card with the key
    expect(page.locator("#model-name")).to_contain_text("customllm")
    authorizations = []
    page.on("request", lambda req: authorizations.append(req.headers.get("authorization")))
    page.click("#chat-regenerate")
    expect(page.locator(".turn.assistant .answer")).to_have_attribute("data-state", "done")
    expect(page.locator(".turn.assistant .tok")).to_have_count(4)
    assert f"Bearer {KEY}" in authorizations
    # The key stays in the page's memory: nothing stored for the next visit.
    assert page.evaluate("() => localStorage.length + sessionStorage.length + document.cookie.length") == 0
