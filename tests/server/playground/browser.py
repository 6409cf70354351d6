"""Debian's chromium driven by Playwright for Python, for the playground's tests.

Playwright rather than Selenium: it intercepts every request the page makes (a route on the whole context, so a
request to any host but 127.0.0.1 is seen, refused and fails the test), reports console messages and uncaught
errors, and waits for the page's state by itself, all in one package with no driver binary to match to the browser.
Its own browser download is not used: `executable_path` points it at /usr/bin/chromium (.ci/run installs it).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
LOOPBACK = "127.0.0.1"
SCREENSHOTS_ENV = "CUSTOMLLM_PLAYGROUND_SCREENSHOTS"


def require_browser() -> None:
    """Skip, saying why, where chromium or playwright is missing; in CI (CI set) fail instead: they must run."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Debian's chromium ({CHROMIUM}; .ci/run installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright for Python (the dev extra)")
    if missing:
        message = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + ", and CI must run them")
        pytest.skip(message)


@dataclasses.dataclass
class PageWatch:
    """What a page did: console errors and uncaught exceptions, requests to other hosts (refused), API bodies."""

    errors: list[str] = dataclasses.field(default_factory=list)
    foreign: list[str] = dataclasses.field(default_factory=list)
    requests: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)  # (method, path, JSON body)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies the page POSTed to `path`, in order."""
        return [body for method, p, body in self.requests if method == "POST" and p == path]


@contextmanager
def watched_page(browser: Any) -> Iterator[tuple[Any, PageWatch]]:
    """A fresh page (its own context) whose every request is checked: any host but 127.0.0.1 is refused and
    recorded, and the test fails at the end if there was one."""
    context = browser.new_context(viewport={"width": 1280, "height": 820})
    watch = PageWatch()

    def route(route: Any) -> None:
        if urlsplit(route.request.url).hostname != LOOPBACK:
            watch.foreign.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def request(req: Any) -> None:
        url = urlsplit(req.url)
        if url.scheme in ("http", "https"):
            body = req.post_data_json if req.method == "POST" and req.post_data else None
            watch.requests.append((req.method, url.path, body))

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and watch.errors.append(message.text))
    page.on("pageerror", lambda error: watch.errors.append(f"uncaught: {error}"))
    page.on("request", request)
    try:
        yield page, watch
    finally:
        context.close()
    assert not watch.foreign, f"the page requested other hosts than {LOOPBACK}: {watch.foreign}"


def expect(target: Any) -> Any:
    """Playwright's auto-waiting assertions (imported late: collecting the tests must not need playwright)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def fill(page: Any, **fields: object) -> None:
    """Type values into the settings, by element id (max_tokens -> #max-tokens)."""
    for name, value in fields.items():
        page.fill("#" + name.replace("_", "-"), str(value))


def token_texts(entries: list[dict[str, Any]], content: str) -> list[str]:
    """Each token's share of `content`, from chat logprobs' bytes: a character split over tokens belongs to the
    token that completes it; tokens past the end (an EOS, a stop string) have none."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, length = [], 0
    for entry in entries:
        starts.append(min(length, len(content)))
        length += len(decoder.decode(bytes(entry["bytes"])))
    ends = [*starts[1:], len(content)]
    return [content[start:end] for start, end in zip(starts, ends, strict=True)]


def routed_rows(routed: dict[str, Any]) -> np.ndarray:
    """The API's routed_experts as an int array [T tokens, L layers, K]."""
    assert routed["dtype"] == "int32"
    return np.frombuffer(base64.b64decode(routed["data"]), dtype="<i4").reshape(routed["shape"])


def non_streamed(body: dict[str, Any]) -> dict[str, Any]:
    """The page's request body asking for one JSON answer instead of a stream: the same seeded request."""
    return {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
