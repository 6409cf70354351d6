"""GET / and /playground (the page) and /playground/<file> (its CSS and JavaScript), served from memory.

The files are the same bytes on every server: nothing about this server is rendered into them, so the page shows
no more than its requests to the API (with the key the user types) and the already open /metrics return.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from server.openai.serving import APIError

MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8"}
# The browser itself keeps the page on this origin: no script, style, font or request from elsewhere (a page that
# needed the network would break here, not only in its tests), no inline script, and no framing by another site.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never runs with a stale script
}


def load_static_files() -> dict[str, tuple[bytes, str]]:
    """The playground's files by name: (content, media type)."""
    static = resources.files("server.playground") / "static"
    files = {}
    for entry in static.iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    assert "index.html" in files, f"the playground's index.html is missing from {static}"
    return files


def add_playground_routes(app: FastAPI) -> None:
    """The routes of the page and its files, on the app itself (so the app's HEAD-for-GET pass sees them), left out
    of the OpenAPI schema: they are not the API."""
    files = load_static_files()

    def serve(name: str) -> Response:
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return serve("index.html")

    @app.get("/playground", include_in_schema=False)
    async def page() -> Response:
        return serve("index.html")

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in files:
            # The name is not echoed (as for unknown routes).
            raise APIError(404, "The playground has no such file", "NotFoundError")
        return serve(name)
