"""POST /v1/chat/completions: messages rendered with the chat template, choices or SSE chunks out; output
constrained by response_format / structured_outputs or by a forced tool_choice, tool calls parsed from the text."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.engine.engine import Engine
from server.engine.grammar import GrammarCompiler
from server.engine.sampling_params import SamplingParams
from server.openai.chat_template import ChatMLTemplate, ChatTemplate
from server.openai.choice import ChoiceBuilder
from server.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    ChatTool,
    DeltaMessage,
    FinishReason,
    FunctionCallOut,
    NamedToolChoice,
    ToolCallOut,
    UsageInfo,
    chat_template_input,
)
from server.openai.serving import (
    APIError,
    OpenAIServing,
    Prompt,
    ServingLimits,
    check_unicode,
    drain,
    sse_response,
    stream_chunks,
)
from server.openai.tool_parsers import HermesToolParser, parse_tool_calls, tool_calls_grammar
from server.tokenizer import Tokenizer


def _finish_reason(builder: ChoiceBuilder, has_calls: bool) -> FinishReason | None:
    return "tool_calls" if has_calls and builder.finish_reason == "stop" else builder.finish_reason


class OpenAIServingChat(OpenAIServing):
    """The chat completions endpoint."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServingLimits,
                 grammars: GrammarCompiler | None = None, chat_template: ChatTemplate | None = None) -> None:
        super().__init__(engine, tokenizer, limits, grammars)
        self.chat_template = chat_template or ChatMLTemplate(tokenizer)

    def render_prompt(self, req_messages: list[dict[str, Any]], tools: list[ChatTool] | None,
                      add_generation_prompt: bool = True, continue_final_message: bool = False,
                      kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False) -> list[int]:
        """Token ids of the conversation rendered with the chat template (also what /tokenize returns)."""
        for i, message in enumerate(req_messages):
            check_unicode(message["content"], f"messages[{i}].content")
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        try:
            text = self.chat_template.render(req_messages, tool_dicts, add_generation_prompt,
                                             continue_final_message, kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise APIError(400, f"cannot render messages: {exc}", param="messages") from exc
        check_unicode(text, "messages")  # also what the checks above do not see (tool names, descriptions)
        return self.tokenizer.encode(text, add_special_tokens)

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
        """The rendered messages (with the tools in play) and the sampling parameters of a chat request (also
        what /render returns)."""
        self.check_model(req.model)
        tools = req.tools if req.effective_tool_choice != "none" else None
        token_ids = self.render_prompt(chat_template_input(req.messages), tools, req.add_generation_prompt,
                                       req.continue_final_message, req.chat_template_kwargs)
        max_tokens = req.max_tokens_limit
        if max_tokens is None:
            max_tokens = self.room_for_output(len(token_ids), "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return Prompt(token_ids, ""), self._sampling_params(req, max_tokens, top, self.tokenizer.chat_stop_token_ids)

    async def create_chat_completion(self, req: ChatCompletionRequest, request: Request) -> Response:
        prompt, params = self.chat_prompt(req)
        token_ids = prompt.token_ids
        choice = req.effective_tool_choice
        tools = req.tools if choice != "none" else None
        tool_grammar = None
        if tools:
            named = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else None
            tool_grammar = await self._compile(lambda: tool_calls_grammar(tools or [], named, req.parallel_tool_calls))
        forced = choice in ("required", "named")
        grammar = tool_grammar if forced else await self._compile(req.grammar_request)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self.limits.served_model_name
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        streams = self._start(request_id, [prompt], params, field, grammar)
        builders = self._builders([prompt], params, echo=False)
        outputs = self._outputs(request_id, streams, builders)

        def logprobs_of(builder: ChoiceBuilder, start: int) -> ChatChoiceLogprobs | None:
            if not req.logprobs:
                return None
            return ChatChoiceLogprobs(content=self.token_logprobs(builder.logprobs[start:],
                                                                  req.return_tokens_as_token_ids))

        def usage() -> UsageInfo:
            return UsageInfo.of(len(token_ids), sum(b.num_tokens for b in builders))

        prompt_ids = token_ids if req.return_token_ids else None  # vLLM's return_token_ids

        if not req.stream:
            def message(builder: ChoiceBuilder) -> tuple[ChatResponseMessage, bool]:
                if not tools:
                    return ChatResponseMessage(content=builder.text), False
                content, calls = parse_tool_calls(builder.text, forced, req.parallel_tool_calls)
                out = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                       for c in calls]
                return ChatResponseMessage(content=content, tool_calls=out or None), bool(calls)

            async def body() -> Response:
                await drain(outputs, builders)
                choices = []
                for b in builders:
                    msg, has_calls = message(b)
                    choices.append(ChatCompletionChoice(index=b.index, message=msg, logprobs=logprobs_of(b, 0),
                                                        finish_reason=_finish_reason(b, has_calls),
                                                        stop_reason=b.stop_reason,
                                                        token_ids=b.token_ids if req.return_token_ids else None,
                                                        routed_experts=b.routed_experts()))
                return JSONResponse(ChatCompletionResponse(id=request_id, created=created, model=model,
                                                           choices=choices, usage=usage(),
                                                           prompt_token_ids=prompt_ids).model_dump())
            return await self._respond(request, body)

        parsers = {b.index: HermesToolParser(forced, req.parallel_tool_calls) for b in builders} if tools else {}
        chunks, closing = stream_chunks(req.stream_options, usage,
                                        partial(ChatCompletionChunk, id=request_id, created=created, model=model))

        def chunk(choice: ChatCompletionStreamChoice, first: bool = False) -> str:
            return chunks([choice], prompt_token_ids=prompt_ids if first else None)

        def delta(builder: ChoiceBuilder, text: str, logprobs_from: int) -> str:
            lp = logprobs_of(builder, logprobs_from)
            parser = parsers.get(builder.index)
            calls = None
            if parser is not None:
                text, calls = parser.feed(text, final=builder.finish_reason is not None)
                if not text and not calls and builder.finish_reason is None and not lp:
                    return ""  # held back: nothing to send yet
            return chunk(ChatCompletionStreamChoice(
                index=builder.index, delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                logprobs=lp, finish_reason=_finish_reason(builder, bool(parser and parser.calls)),
                stop_reason=builder.stop_reason,
                token_ids=builder.unsent_token_ids() if req.return_token_ids else None,
                routed_experts=builder.unsent_routed_experts()))

        # Each choice's opening chunk carries the prompt's ids (as vLLM's role chunks do).
        opening = [chunk(ChatCompletionStreamChoice(index=b.index, delta=DeltaMessage(role="assistant", content="")),
                         first=True) for b in builders]
        return sse_response(outputs, builders, opening, delta, closing)
