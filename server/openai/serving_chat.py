"""POST /v1/chat/completions: messages rendered with the chat template, choices or SSE chunks out."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.engine.sampling_params import SamplingParams
from server.openai.choice import ChoiceBuilder
from server.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    chat_template_input,
)
from server.openai.serving import APIError, OpenAIServing, Prompt, check_unicode, drain, sse, sse_response


class OpenAIServingChat(OpenAIServing):
    """The chat completions endpoint."""

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[Prompt, SamplingParams]:
        """The rendered messages and the sampling parameters of a chat request (also what /render returns)."""
        self.check_model(req.model)
        messages = chat_template_input(req.messages)
        for i, message in enumerate(messages):
            check_unicode(message["content"], f"messages[{i}].content")
        try:
            token_ids = self.tokenizer.encode_chat(messages)
        except (TypeError, ValueError) as exc:
            raise APIError(400, f"cannot render messages: {exc}", param="messages") from exc
        max_tokens = req.max_tokens_limit
        if max_tokens is None:
            max_tokens = self.limits.max_model_len - len(token_ids)
            if max_tokens < 1:
                raise APIError(400, f"this model's maximum context length is {self.limits.max_model_len} tokens, "
                                    f"but the messages take {len(token_ids)} tokens", param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        return Prompt(token_ids, ""), self._sampling_params(req, max_tokens, top, self.tokenizer.chat_stop_token_ids)

    async def create_chat_completion(self, req: ChatCompletionRequest, request: Request) -> Response:
        prompt, params = self.chat_prompt(req)
        token_ids = prompt.token_ids
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self.limits.served_model_name
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        streams = self._start(request_id, [prompt], params, field)
        builders = self._builders([prompt], params, echo=False)
        outputs = self._outputs(request_id, streams, builders)

        def logprobs_of(builder: ChoiceBuilder, start: int) -> ChatChoiceLogprobs | None:
            if not req.logprobs:
                return None
            tok = self.tokenizer

            def entry(token_id: int, lp: float) -> TopLogprob:
                return TopLogprob(token=tok.token_text(token_id), logprob=lp, bytes=list(tok.token_bytes(token_id)))
            content = [ChatCompletionLogprob(**entry(e.token_id, e.logprob).model_dump(),
                                             top_logprobs=[entry(t, lp) for t, lp in e.top])
                       for e in builder.logprobs[start:]]
            return ChatChoiceLogprobs(content=content)

        def usage() -> UsageInfo:
            return UsageInfo.of(len(token_ids), sum(b.num_tokens for b in builders))

        if not req.stream:
            async def body() -> Response:
                await drain(outputs, builders)
                choices = [ChatCompletionChoice(index=b.index, message=ChatResponseMessage(content=b.text),
                                                logprobs=logprobs_of(b, 0), finish_reason=b.finish_reason,
                                                stop_reason=b.stop_reason) for b in builders]
                return JSONResponse(ChatCompletionResponse(id=request_id, created=created, model=model,
                                                           choices=choices, usage=usage()).model_dump())
            return await self._respond(request, body)

        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice],
                                            usage=usage() if continuous else None))

        def delta(builder: ChoiceBuilder, text: str, logprobs_from: int) -> str:
            lp = logprobs_of(builder, logprobs_from)
            return chunk(ChatCompletionStreamChoice(
                index=builder.index, delta=DeltaMessage(content=text) if text else DeltaMessage(),
                logprobs=lp, finish_reason=builder.finish_reason, stop_reason=builder.stop_reason))

        opening = [chunk(ChatCompletionStreamChoice(index=b.index, delta=DeltaMessage(role="assistant", content="")))
                   for b in builders]
        closing = None
        if req.stream_options and req.stream_options.include_usage:
            def closing() -> str:
                return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                                usage=usage()))
        return sse_response(outputs, builders, opening, delta, closing)
