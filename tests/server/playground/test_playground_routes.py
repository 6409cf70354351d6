"""GET / and /playground serve the static playground with a policy that keeps it on this origin; the files load
nothing from elsewhere (checked without a browser, so this holds where chromium is missing too)."""

import re

import httpx

from server.playground.router import MEDIA_TYPES, load_static_files

FILES = load_static_files()


def test_the_page_and_its_files_are_served_with_a_same_origin_policy(http: httpx.Client) -> None:
    page, _ = FILES["index.html"]
    for path in ("/", "/playground"):
        reply = http.get(path)
        assert reply.status_code == 200 and reply.content == page
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        policy = reply.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
        assert reply.headers["x-content-type-options"] == "nosniff"
    head = http.head("/")
    assert head.status_code == 200 and head.content == b""
    for name, (content, media_type) in FILES.items():
        reply = http.get(f"/playground/{name}")
        assert reply.status_code == 200 and reply.content == content
        assert reply.headers["content-type"] == media_type


def test_an_unknown_playground_file_is_a_404_in_the_openai_shape(http: httpx.Client) -> None:
    for path in ("/playground/nothing.js", "/playground/%2e%2e%2fcli.py", "/playground/static"):
        reply = http.get(path)
        assert reply.status_code == 404
        error = reply.json()["error"]
        assert error["type"] == "NotFoundError" and "nothing" not in error["message"]


def test_the_page_loads_nothing_from_elsewhere() -> None:
    assert set(FILES) >= {"index.html", "main.js", "playground.css"}
    assert {name[name.rfind("."):] for name in FILES} <= set(MEDIA_TYPES)
    texts = {name: content.decode("utf-8") for name, (content, _) in FILES.items()}
    for name, text in texts.items():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"{name} names a host"
        assert "@import" not in text and "url(" not in text, f"{name} loads a stylesheet resource"
    page = texts["index.html"]
    for reference in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert reference == "data:," or reference.removeprefix("/playground/") in FILES, reference
    assert "<script>" not in page and "style=" not in page  # the policy refuses inline script and style
    for name, text in texts.items():
        if name.endswith(".js"):
            for module in re.findall(r'from "([^"]+)"', text):
                assert module.startswith("./") and module[2:] in FILES, f"{name} imports {module}"
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text, f"{name} renders HTML from text"
