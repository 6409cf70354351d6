"""Fixtures of the playground's browser tests: one chromium per module, a fresh watched page per test, and the
screenshot directory (CUSTOMLLM_PLAYGROUND_SCREENSHOTS, else a directory under pytest's tmp path)."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.live import LiveServer
from tests.server.playground.browser import CHROMIUM, SCREENSHOTS_ENV, PageWatch, require_browser, watched_page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get(SCREENSHOTS_ENV)
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen)
    return tmp_path_factory.mktemp("playground-screenshots")


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[tuple[Any, PageWatch]]:
    """The playground, loaded from the module's server, and what it did."""
    with watched_page(browser) as (page, watch):
        page.goto(server.base_url + "/")
        page.wait_for_selector("#server-state[data-ready]")
        yield page, watch
