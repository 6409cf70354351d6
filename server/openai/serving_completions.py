"""POST /v1/completions: prompts (text or token ids) in, choices or SSE chunks out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.openai.choice import ChoiceBuilder
from server.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    PromptLogprobEntry,
    UsageInfo,
)
from server.openai.serving import (
    SSE_HEADERS,
    APIError,
    OpenAIServing,
    Prompt,
    check_unicode,
    drain,
    sse,
    sse_response,
    stream_chunks,
)
from server.vllm.prompt_logprobs import echo_logprobs, top_dict, vllm_prompt_logprobs


class OpenAIServingCompletion(OpenAIServing):
    """The completions endpoint."""

    def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        prompts = []
        for p in req.prompts:
            if isinstance(p, str):
                check_unicode(p, "prompt")
                prompts.append(Prompt(self.tokenizer.encode(p), p))
            else:
                bad = next((t for t in p if t >= self.tokenizer.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"prompt token id {bad} is outside the vocabulary "
                                        f"[0, {self.tokenizer.vocab_size})", param="prompt")
                prompts.append(Prompt(p, self.tokenizer.decode(p, skip_special_tokens=False) if req.echo else ""))
        for prompt in prompts:
            if not prompt.token_ids:
                raise APIError(400, "prompt encodes to no tokens", param="prompt")
        return prompts

    async def create_completion(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        prompts = self.completion_prompts(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = self.limits.served_model_name
        # Prompt logprobs for echo + logprobs (OpenAI) and for prompt_logprobs (vLLM): one pass computes both.
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        wanted = [k for k in (echo_lp, req.prompt_logprobs) if k is not None]
        params = self._sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs=max(wanted, default=None))
        # Echo only: no model run, the same limits (routed experts need the model to read the prompt).
        if req.max_tokens == 0 and params.prompt_logprobs is None and not params.return_routed_experts:
            self.check_request(prompts, params)
            return self._echo_only(req, prompts, request_id, created)
        so = req.structured_outputs
        grammar = await self._compile(so.to_grammar if so is not None else lambda: None)
        streams = self._start(request_id, prompts, params, grammar=grammar)
        builders = self._builders(prompts, params, req.echo)
        num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        outputs = self._outputs(request_id, streams, builders)
        label = self.token_label(req.return_tokens_as_token_ids)

        def logprobs_of(builder: ChoiceBuilder, start: int, with_prompt: bool) -> CompletionLogprobs | None:
            if req.logprobs is None:
                return None
            entries = builder.logprobs[start:]
            lp = CompletionLogprobs(
                tokens=[label(e.token_id) for e in entries], token_logprobs=[e.logprob for e in entries],
                top_logprobs=[top_dict(label, e.token_id, e.logprob, e.top) for e in entries],
                text_offset=[e.text_offset for e in entries])
            if not (with_prompt and echo_lp is not None and builder.prompt_logprobs is not None):
                return lp
            head = echo_logprobs(self.tokenizer, label, prompts[builder.index // req.n].token_ids,
                                 builder.prompt_logprobs, echo_lp)
            return CompletionLogprobs(tokens=head.tokens + lp.tokens,
                                      token_logprobs=head.token_logprobs + lp.token_logprobs,
                                      top_logprobs=head.top_logprobs + lp.top_logprobs,
                                      text_offset=head.text_offset + lp.text_offset)

        def prompt_part(builder: ChoiceBuilder) -> list[dict[str, PromptLogprobEntry] | None] | None:
            if req.prompt_logprobs is None or builder.prompt_logprobs is None:
                return None
            return vllm_prompt_logprobs(self.tokenizer, builder.prompt_logprobs, req.prompt_logprobs)

        def usage() -> UsageInfo:
            return UsageInfo.of(num_prompt_tokens, sum(b.num_tokens for b in builders))

        prompt_ids_sent: set[int] = set()

        def prompt_ids(index: int) -> list[int] | None:
            """return_token_ids: a choice's prompt ids, once (streamed: in its first chunk)."""
            if not req.return_token_ids or index in prompt_ids_sent:
                return None
            prompt_ids_sent.add(index)
            return prompts[index // req.n].token_ids

        if not req.stream:
            async def body() -> Response:
                await drain(outputs, builders)
                choices = [CompletionChoice(
                    index=b.index, text=(prompts[b.index // req.n].text if req.echo else "") + b.text,
                    logprobs=logprobs_of(b, 0, True), finish_reason=b.finish_reason, stop_reason=b.stop_reason,
                    prompt_logprobs=prompt_part(b), prompt_token_ids=prompt_ids(b.index),
                    token_ids=b.token_ids if req.return_token_ids else None,
                    routed_experts=b.routed_experts())
                    for b in builders]
                return JSONResponse(CompletionResponse(id=request_id, created=created, model=model,
                                                       choices=choices, usage=usage()).model_dump())
            return await self._respond(request, body)

        chunks, closing = stream_chunks(req.stream_options, usage, partial(CompletionStreamResponse, id=request_id,
                                                                           created=created, model=model))

        def chunk(choice: CompletionChoice) -> str:
            return chunks([choice])

        # With prompt logprobs to send, the echoed prompt waits for them: it leads the choice's first chunk.
        echo_first = req.echo and params.prompt_logprobs is not None

        def delta(builder: ChoiceBuilder, text: str, logprobs_from: int) -> str:
            first = builder.prompt_pending
            builder.prompt_sent = builder.prompt_sent or first
            head = prompts[builder.index // req.n].text if first and echo_first else ""
            return chunk(CompletionChoice(index=builder.index, text=head + text,
                                          logprobs=logprobs_of(builder, logprobs_from, first),
                                          finish_reason=builder.finish_reason, stop_reason=builder.stop_reason,
                                          prompt_logprobs=prompt_part(builder) if first else None,
                                          prompt_token_ids=prompt_ids(builder.index),
                                          token_ids=builder.unsent_token_ids() if req.return_token_ids else None,
                                          routed_experts=builder.unsent_routed_experts()))

        opening = [chunk(CompletionChoice(index=b.index, text=prompts[b.index // req.n].text,
                                          prompt_token_ids=prompt_ids(b.index)))
                   for b in builders] if req.echo and not echo_first else []
        return sse_response(outputs, builders, opening, delta, closing)

    def _echo_only(self, req: CompletionRequest, prompts: list[Prompt], request_id: str, created: int) -> Response:
        """max_tokens 0 with echo: each choice is its prompt, as one JSON body or as SSE like any stream."""
        model = self.limits.served_model_name
        ids = req.return_token_ids
        choices = [CompletionChoice(index=i * req.n + j, text=p.text, finish_reason="length",
                                    prompt_token_ids=p.token_ids if ids else None, token_ids=[] if ids else None)
                   for i, p in enumerate(prompts) for j in range(req.n)]
        usage = UsageInfo.of(sum(len(p.token_ids) for p in prompts), 0)
        if not req.stream:
            return JSONResponse(CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                                   usage=usage).model_dump())
        chunk, closing = stream_chunks(req.stream_options, lambda: usage, partial(
            CompletionStreamResponse, id=request_id, created=created, model=model))
        events = [chunk([c]) for c in choices] + ([closing()] if closing else []) + [sse("[DONE]")]

        async def body() -> AsyncIterator[str]:
            for event in events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
