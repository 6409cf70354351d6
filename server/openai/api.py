"""The FastAPI app: routes, OpenAI-style errors, API key, body-size limit, HTTP metrics, engine lifespan."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.drain import Drain
from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.metrics import ServerMetrics
from server.openai.chat_template import ChatTemplate
from server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    describe_errors,
)
from server.openai.serving import APIError, ServingLimits
from server.openai.serving_chat import OpenAIServingChat
from server.openai.serving_completions import OpenAIServingCompletion
from server.openai.serving_responses import OpenAIServingResponses
from server.openai.serving_tokenization import OpenAIServingTokenization
from server.playground.router import add_playground_routes
from server.tokenizer import Tokenizer
from server.vllm.render import OpenAIServingRender

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/completions/render",
          "/v1/chat/completions/render", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info", "/health",
          "/get_load", "/version", "/metrics")
MODEL_ROUTE = "/v1/models/{model}"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """HTTP-level settings (the engine's own limits live in SchedulerConfig)."""

    served_model_name: str = "customllm"
    api_key: str | None = None
    max_queued_requests: int = 1024
    max_request_bytes: int = 1 << 20
    cors_allow_origins: tuple[str, ...] = ()
    # The static page at GET / (server/playground): on by default, since it exposes nothing beyond the API it calls.
    enable_playground: bool = True


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse.of(message, type, param, status).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


class GuardMiddleware:
    """Outermost layer: HTTP metrics by route template, the API key on /v1/*, and the request-body limit.

    The body is read here, up to the limit, and replayed to the app, so an oversized or endless upload is cut off
    before any parsing; after the body, the app's receive() reaches the client again (disconnect detection).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], settings: ServerSettings,
                 metrics: ServerMetrics, drain: Drain) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else MODEL_ROUTE if path.startswith("/v1/models/") else "other"
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.drain.in_flight += 1  # the event loop's thread only: no lock needed
        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            self.drain.in_flight -= 1
            self.metrics.observe_http(route, status)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        key = self.settings.api_key
        if key is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            # Constant-time compare, on bytes so non-ASCII input cannot raise.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode("utf-8"), key.encode("utf-8")):
                await error_response(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                     "AuthenticationError")(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await error_response(413, f"request body exceeds the limit of {limit} bytes",
                                     param="body")(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [dict(e) for e in exc.errors()]
    for e in errors:
        loc = tuple(e.get("loc", ()))
        e["loc"] = loc[1:] if loc[:1] == ("body",) else loc
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(400, f"Invalid JSON body: {first.get('ctx', {}).get('error', 'malformed JSON')}",
                              param="body")
    if first and not first.get("loc") and first.get("type") in ("model_attributes_type", "missing"):
        # No body, a non-object JSON value, or a body FastAPI did not parse because its Content-Type is not JSON
        # (FastAPI's strict content type, a CSRF guard); pydantic's own words would not say which.
        return error_response(400, "The request body must be a JSON object sent with Content-Type: application/json",
                              param="body")
    message, param = describe_errors(errors) if errors else ("Invalid request", None)
    return error_response(400, message, param=param)


def create_app(engine: Engine, tokenizer: Tokenizer, settings: ServerSettings, metrics: ServerMetrics,
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The HTTP app; its lifespan starts and stops the engine. Without a chat template, the bundled ChatML."""
    limits = ServingLimits(settings.served_model_name, engine.config.max_model_len, settings.max_queued_requests)
    grammars = GrammarCompiler(tokenizer.to_json(), engine.vocab_size, tokenizer.eos_token_id)
    serving = OpenAIServingCompletion(engine, tokenizer, limits, grammars)
    serving_chat = OpenAIServingChat(engine, tokenizer, limits, grammars, chat_template)
    serving_render = OpenAIServingRender(serving, serving_chat)
    serving_responses = OpenAIServingResponses(engine, tokenizer, limits, grammars, serving_chat)
    serving_tokenization = OpenAIServingTokenization(serving_chat)
    # One card, so /v1/models and /v1/models/{model} give the same object (created = when the server started).
    card = ModelCard(id=settings.served_model_name, max_model_len=limits.max_model_len)
    metrics.set_served_model_name(settings.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.is_alive:
            engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="CustomLLM Server", version=VERSION, lifespan=lifespan)
    drain = Drain()
    app.state.drain = drain  # server/drain.py's DrainingServer starts it on SIGTERM
    app.state.engine = engine

    def unavailable() -> JSONResponse | None:
        if drain.draining:
            # Connection: close, so a client's pool drops its kept-alive connections to this draining server.
            return error_response(503, "the server is shutting down", "ServiceUnavailableError",
                                  headers={"Retry-After": "5", "Connection": "close"})
        if not engine.is_alive:
            return error_response(503, f"the engine is not running: {engine.dead_reason or 'stopped'}",
                                  "ServiceUnavailableError")
        return None

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        # exc.headers carries a 405's Allow (RFC 9110 15.5.6 requires it).
        return error_response(exc.status_code, str(exc.detail), kind,
                              headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # details go to the log, never to the client
        return error_response(500, "internal server error", "InternalServerError")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return unavailable() or await serving.create_completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return unavailable() or await serving_chat.create_chat_completion(body, request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return unavailable() or await serving_responses.create_response(body, request)

    # Tokenizer-only, so they answer while draining too: a router may render before it sees the 503 of /health.
    @app.post("/v1/completions/render")
    async def render_completion(body: CompletionRequest) -> JSONResponse:
        return JSONResponse(serving_render.render_completion(body))

    @app.post("/v1/chat/completions/render")
    async def render_chat_completion(body: ChatCompletionRequest) -> JSONResponse:
        return JSONResponse(serving_render.render_chat(body))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card])

    @app.get(MODEL_ROUTE.replace("}", ":path}"))  # an id may hold slashes ("org/name")
    async def model(model: str) -> ModelCard:
        if model != settings.served_model_name:
            # The id is not echoed: a URL path may hold anything (a 404 body reflects none of it, as for routes).
            raise APIError(404, f"The model does not exist; this server serves '{settings.served_model_name}'",
                           "NotFoundError", "model")
        return card

    @app.post("/tokenize", response_model_exclude_none=True)  # token_strs only when asked for
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving_tokenization.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving_tokenization.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfoResponse:
        return serving_tokenization.tokenizer_info()

    @app.get("/health")
    async def health() -> Response:
        return unavailable() or Response(status_code=200)

    @app.get("/get_load")
    async def get_load() -> dict[str, int]:
        # vllm-router's power_of_two policy polls this and reads "load"; the split is for people.
        running, waiting = engine.num_requests_running, engine.num_requests_waiting
        return {"load": running + waiting, "num_reqs": running, "num_waiting_reqs": waiting}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    if settings.enable_playground:
        add_playground_routes(app)

    # HEAD wherever GET is served (load balancers probe with it); uvicorn sends the headers without the body. The
    # OpenAPI schema is built (and cached) first, so it lists the GETs alone: HEAD is implied (RFC 9110 9.3.2).
    app.openapi()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods:
            route.methods.add("HEAD")
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics, drain=drain)
    return app



