"""POST /v1/responses: OpenAI's Responses API on the chat path, stateless.

The input items become chat messages (server/openai/protocol/responses.py), rendered by the chat template with the
tools in play; text.format and forced tool calls go through the same grammar path as chat, and tool calls are
parsed from the text by the same parser. The output is built as items (server/openai/responses_items.py), sent as
one `response` object or as SSE events (`event:` + `data:`, numbered by `sequence_number`, no `[DONE]`) whose final
event carries the whole response.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.outputs import RequestStream
from server.engine.sampling_params import SamplingParams
from server.openai.choice import ChoiceBuilder
from server.openai.protocol import chat_template_input
from server.openai.protocol.responses import ResponsesRequest
from server.openai.protocol.responses_output import (
    IncompleteDetails,
    InputTokensDetails,
    ResponseError,
    ResponseEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
    item_id,
)
from server.openai.responses_items import OutputItems
from server.openai.serving import (
    SSE_HEADERS,
    APIError,
    OpenAIServing,
    Prompt,
    ServingLimits,
    check_unicode,
    raise_if_failed,
)
from server.openai.serving_chat import OpenAIServingChat
from server.openai.tool_parsers import HermesToolParser, tool_calls_grammar
from server.tokenizer import Tokenizer

_FAILED = {"error": "the model failed while generating this response",
           "abort": "the response was aborted before it finished (the server is shutting down)"}


def _sse_event(event: ResponseEvent) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


class OpenAIServingResponses(OpenAIServing):
    """The Responses endpoint; messages are rendered by the chat endpoint's template."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServingLimits, grammars: GrammarCompiler,
                 chat: OpenAIServingChat) -> None:
        super().__init__(engine, tokenizer, limits, grammars)
        self.chat = chat

    def response_prompt(self, req: ResponsesRequest) -> tuple[Prompt, SamplingParams]:
        """The rendered conversation (with the tools in play) and the sampling parameters."""
        self.check_model(req.model)
        for where, text in req.texts:
            check_unicode(text, where)
        tools = [t.chat_tool() for t in req.function_tools] if req.effective_tool_choice != "none" else None
        try:
            token_ids = self.chat.render_prompt(chat_template_input(req.messages), tools)
        except APIError as exc:
            # Named by the field it came in: the messages are this request's input.
            raise APIError(exc.status, exc.message.replace("messages", "input"), exc.type, "input") from exc
        max_tokens = req.max_output_tokens or self.room_for_output(len(token_ids), "input")
        params = self._checked_params(req, self.tokenizer.chat_stop_token_ids, temperature=req.temperature,
                                      top_p=req.top_p, seed=req.seed, max_tokens=max_tokens,
                                      logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return Prompt(token_ids, ""), params

    async def create_response(self, req: ResponsesRequest, request: Request) -> Response:
        prompt, params = self.response_prompt(req)
        choice = req.effective_tool_choice
        tools = [t.chat_tool() for t in req.function_tools] if choice != "none" else []
        tool_grammar = None
        if tools:
            tool_grammar = await self._compile(
                lambda: tool_calls_grammar(tools, req.named_tool, req.parallel_tool_calls))
        forced = choice in ("required", "named")
        grammar = tool_grammar if forced else await self._compile(req.grammar_request)
        response_id = item_id("resp")
        streams = self._start(response_id, [prompt], params, "max_output_tokens", grammar)
        builders = self._builders([prompt], params, echo=False)
        parser = HermesToolParser(forced, req.parallel_tool_calls) if tools else None
        run = _ResponseRun(self, req, response_id, streams, builders, parser)
        if not req.stream:
            async def body() -> Response:
                async for _ in run.events():
                    pass
                raise_if_failed(builders)
                return JSONResponse(run.response().model_dump())
            return await self._respond(request, body)

        async def sse() -> AsyncIterator[str]:
            async for event in run.events():
                yield _sse_event(event)

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


class _ResponseRun:
    """One response being generated: its output items, its events and the response object at any point."""

    def __init__(self, serving: OpenAIServingResponses, req: ResponsesRequest, response_id: str,
                 streams: list[RequestStream], builders: list[ChoiceBuilder], parser: HermesToolParser | None) -> None:
        self._serving = serving
        self.req = req
        self.id = response_id
        self.created_at = int(time.time())
        self.model = serving.limits.served_model_name
        self.streams = streams
        [self.builder] = builders
        self._outputs = serving._outputs(response_id, streams, builders)
        self._sequence: Iterator[int] = itertools.count()
        self.items = OutputItems(self._sequence, parser)
        self.status: ResponseStatus = "in_progress"

    async def events(self) -> AsyncIterator[ResponseEvent]:
        yield self._lifecycle("response.created")
        yield self._lifecycle("response.in_progress")
        logprobs_sent = 0
        async for builder, text, _ in self._outputs:
            # builder.logprobs only fills when the request included logprobs. The token that ends the output by
            # "stop" (an EOS) adds no text, so it has no entry in the text's logprobs (chat's keep it, as usage does).
            entries = builder.logprobs[logprobs_sent:]
            logprobs_sent = len(builder.logprobs)
            if builder.finish_reason == "stop" and not builder.stopped_by_string:
                entries = entries[:-1]
            logprobs = self._serving.token_logprobs(entries)
            for event in self.items.feed(text, builder.finish_reason is not None, logprobs):
                yield event
        reason = self.builder.finish_reason
        self.status = "incomplete" if reason == "length" else "failed" if reason in _FAILED else "completed"
        for event in self.items.finish("incomplete" if self.status != "completed" else "completed"):
            yield event
        terminal = {"completed": "response.completed", "incomplete": "response.incomplete"}
        yield self._lifecycle(terminal.get(self.status, "response.failed"))

    def _lifecycle(self, kind: str) -> ResponseLifecycleEvent:
        return ResponseLifecycleEvent(type=kind, sequence_number=next(self._sequence), response=self.response())

    def response(self) -> ResponseObject:
        req, done = self.req, self.status != "in_progress"
        reason = self.builder.finish_reason
        text: dict[str, Any] = {"format": {"type": "text"}}
        if req.text is not None:
            text |= req.text.model_dump(by_alias=True, exclude_none=True)
        usage = None
        if done:
            stream = self.streams[0]
            usage = ResponseUsage(input_tokens=stream.num_prompt_tokens, output_tokens=self.builder.num_tokens,
                                  input_tokens_details=InputTokensDetails(cached_tokens=stream.num_cached_tokens),
                                  total_tokens=stream.num_prompt_tokens + self.builder.num_tokens)
        return ResponseObject(
            id=self.id, created_at=self.created_at, status=self.status,
            completed_at=int(time.time()) if done else None,
            error=ResponseError(message=_FAILED[reason]) if self.status == "failed" and reason in _FAILED else None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if self.status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=self.model,
            output=list(self.items.items) if done else [], parallel_tool_calls=req.parallel_tool_calls,
            temperature=req.temperature, top_p=req.top_p, text=text,
            tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
            tools=[t.model_dump() for t in req.function_tools], usage=usage, user=req.user,
            reasoning=req.reasoning.model_dump() if req.reasoning is not None else {"effort": None, "summary": None},
            safety_identifier=req.safety_identifier, prompt_cache_key=req.prompt_cache_key,
            service_tier=req.service_tier, metadata=req.metadata or {})
