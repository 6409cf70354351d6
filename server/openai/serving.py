"""What the generation endpoints share: limits and errors, admission into the engine, the per-choice output
loop, non-streaming bodies and the SSE stream."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from server.engine.engine import Engine, EngineDeadError
from server.engine.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec
from server.engine.outputs import RequestStream, SequenceOutput
from server.engine.sampling_params import SamplingParams
from server.openai.choice import ChoiceBuilder, TokenLogprob
from server.openai.protocol import (
    ChatCompletionLogprob,
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    GrammarRequest,
    SamplingExtras,
    StreamOptions,
    TopLogprob,
    UsageInfo,
)
from server.tokenizer import Tokenizer

MAX_CHOICES = 256  # prompts x n in one request
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What the HTTP layer admits."""

    served_model_name: str
    max_model_len: int
    max_queued_requests: int


@dataclasses.dataclass
class Prompt:
    token_ids: list[int]
    text: str


def check_unicode(text: str, param: str) -> None:
    """Answer 400 for text that is not valid Unicode."""
    # JSON's "\\ud800" escape decodes to a lone surrogate, which the tokenizer rejects with a TypeError (a 500).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate \\u{ord(text[exc.start]):04x} at "
                            f"character {exc.start}", param=param) from None


def sse(payload: BaseModel | str) -> str:
    body = payload if isinstance(payload, str) else payload.model_dump_json()
    return f"data: {body}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing:
    """The base of the generation endpoints (serving_completions, serving_chat)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServingLimits,
                 grammars: GrammarCompiler | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammars = grammars or GrammarCompiler(tokenizer.to_json(), engine.vocab_size,
                                                    tokenizer.eos_token_id)

    # -- shared ------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.limits.served_model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.limits.served_model_name}'", "NotFoundError", "model")

    def _sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                         logprobs: int | None, extra_stop_ids: tuple[int, ...] = (),
                         prompt_logprobs: int | None = None) -> SamplingParams:
        if req.return_routed_experts and not self.engine.enable_return_routed_experts:
            raise APIError(400, "return_routed_experts needs the server started with --enable-return-routed-experts",
                           param="return_routed_experts")
        return self._checked_params(
            req, extra_stop_ids, n=req.n, temperature=req.temperature, top_p=req.top_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            logit_bias=req.logit_bias or (), seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, include_stop_str_in_output=req.keep_stop_string,
            return_routed_experts=req.return_routed_experts)

    def _checked_params(self, req: SamplingExtras, extra_stop_ids: tuple[int, ...], **fields: Any) -> SamplingParams:
        """SamplingParams of `fields` and the request's stop and vLLM extras (its stop_token_ids plus
        extra_stop_ids), checked against the vocabulary; a 400 naming the field for a bad value."""
        extras: dict[str, Any] = dict(
            top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
            stop=tuple(req.stop_strings), stop_token_ids=tuple(req.stop_token_ids or ()) + extra_stop_ids,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output)
        try:
            params = SamplingParams(**(extras | fields))
            params.validate_token_ids(self.tokenizer.vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param=field_in(str(exc))) from exc
        return params

    async def _compile(self, request: Callable[[], GrammarRequest | None]) -> CompiledGrammar | None:
        """The compiled output constraint of a request (None when unconstrained); a 400 naming the field it came
        in when it is malformed or does not compile."""
        try:
            grammar = request()
            if grammar is None:
                return None
            return await self.grammars.compile_async(GrammarSpec(grammar.kind, grammar.source), grammar.field)
        except (FieldError, GrammarError) as exc:
            raise APIError(400, str(exc), param=exc.field) from exc

    def token_label(self, as_ids: bool) -> Callable[[int], str]:
        """How logprobs name a token: its text, or 'token_id:N' (vLLM's return_tokens_as_token_ids: exact ids back,
        also for tokens whose text is part of a character)."""
        return token_id_label if as_ids else self.tokenizer.token_text

    def token_logprobs(self, entries: list[TokenLogprob], as_ids: bool = False) -> list[ChatCompletionLogprob]:
        """Generated tokens' logprob entries in chat's shape (also the Responses API's): token text (or id label),
        logprob, UTF-8 bytes and the top alternatives."""
        tok, label = self.tokenizer, self.token_label(as_ids)

        def entry(token_id: int, lp: float) -> TopLogprob:
            return TopLogprob(token=label(token_id), logprob=lp, bytes=list(tok.token_bytes(token_id)))
        return [ChatCompletionLogprob(**entry(e.token_id, e.logprob).model_dump(),
                                      top_logprobs=[entry(t, lp) for t, lp in e.top]) for e in entries]

    def room_for_output(self, num_prompt_tokens: int, param: str) -> int:
        """The output tokens left by a rendered prompt when the request sets no limit; a 400 naming `param` (the
        field the prompt came in) when it leaves none."""
        room = self.limits.max_model_len - num_prompt_tokens
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.limits.max_model_len} tokens, "
                                f"and the {param} alone take {num_prompt_tokens} of them: no room is left for "
                                "output", param=param)
        return room

    def _validate_prompt(self, prompt: Prompt, params: SamplingParams, max_tokens_field: str = "max_tokens") -> None:
        try:
            self.engine.validate(prompt.token_ids, params)
        except ValueError as exc:
            if "context length" not in str(exc):
                raise APIError(400, str(exc), param="prompt") from exc
            # Name the field the client sent (chat's max_completion_tokens, say), in the message too.
            raise APIError(400, str(exc).replace("max_tokens", max_tokens_field), param=max_tokens_field) from exc

    def check_request(self, prompts: list[Prompt], params: SamplingParams,
                      max_tokens_field: str = "max_tokens") -> None:
        """The per-request limits of docs/limits.md, on every path (also where no model runs)."""
        if len(prompts) * params.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} exceeds {MAX_CHOICES} choices per request",
                           param="n")
        for prompt in prompts:
            self._validate_prompt(prompt, params, max_tokens_field)

    def _start(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
               max_tokens_field: str = "max_tokens", grammar: CompiledGrammar | None = None) -> list[RequestStream]:
        self.check_request(prompts, params, max_tokens_field)
        waiting = self.engine.num_requests_waiting  # requests, not samples: an n=16 request counts once
        if waiting >= self.limits.max_queued_requests:
            raise APIError(503, f"the server is busy: {waiting} requests are waiting (limit "
                                f"{self.limits.max_queued_requests}); retry later", "ServiceUnavailableError",
                           headers={"Retry-After": "1"})
        try:
            return [self.engine.add_request(f"{request_id}-{i}", p.token_ids, params, grammar)
                    for i, p in enumerate(prompts)]
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not running: {exc}", "ServiceUnavailableError") from exc

    def _builders(self, prompts: list[Prompt], params: SamplingParams, echo: bool) -> list[ChoiceBuilder]:
        return [ChoiceBuilder(p_idx * params.n + i, self.tokenizer, prompt.token_ids, list(params.stop),
                              params.include_stop_str_in_output, params.skip_special_tokens, params.stop_token_ids,
                              text_offset_base=len(prompt.text) if echo else 0, min_tokens=params.min_tokens)
                for p_idx, prompt in enumerate(prompts) for i in range(params.n)]

    async def _outputs(self, request_id: str, streams: list[RequestStream],
                       builders: list[ChoiceBuilder]) -> AsyncIterator[tuple[ChoiceBuilder, str, SequenceOutput]]:
        """Every output of every stream as (its choice, the text it adds, the raw output); aborts on exit."""
        n = len(builders) // len(streams)
        # Bounded, so a consumer that falls behind (a slow client holding up the SSE writer) stops the pumps, and
        # the engine's RequestStream coalesces its tokens; an unbounded queue would hold one entry per step.
        queue: asyncio.Queue[tuple[int, list[SequenceOutput]] | None] = asyncio.Queue(maxsize=len(streams))

        async def pump(p_idx: int, stream: RequestStream) -> None:
            async for batch in stream:
                await queue.put((p_idx, batch))
            await queue.put(None)

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                p_idx, batch = item
                for out in batch:
                    builder = builders[p_idx * n + out.index]
                    was_finished = builder.finish_reason is not None
                    text = builder.add(out)
                    if was_finished:
                        continue
                    if builder.stopped_by_string:
                        self.engine.abort(f"{request_id}-{p_idx}", out.index, "stop")
                    yield builder, text, out
        finally:
            for task in tasks:
                task.cancel()
            for i in range(len(streams)):
                if any(b.finish_reason is None for b in builders[i * n:(i + 1) * n]):
                    self.engine.abort(f"{request_id}-{i}")

    async def _respond(self, request: Request, make_body: Callable[[], Any]) -> Response:
        """Run a non-streaming request, abandoning it (and freeing its cache) if the client goes away."""
        work = asyncio.ensure_future(make_body())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()
            return Response(status_code=499)  # nobody is listening; the status is for the access log
        return work.result()


async def drain(outputs: AsyncIterator[tuple[ChoiceBuilder, str, SequenceOutput]],
                 builders: list[ChoiceBuilder]) -> None:
    """Run a non-streaming request to its end; a sample the model failed on makes it a 500."""
    async for _ in outputs:
        pass
    raise_if_failed(builders)


def raise_if_failed(builders: list[ChoiceBuilder]) -> None:
    """The 500 of a non-streaming request a sample of which the model failed on."""
    if any(b.finish_reason == "error" for b in builders):
        raise APIError(500, "the model failed while generating this request; it was not completed",
                       "InternalServerError")


def stream_chunks(options: StreamOptions | None, usage: Callable[[], UsageInfo], make: Callable[..., BaseModel],
                  ) -> tuple[Callable[..., str], Callable[[], str] | None]:
    """stream_options as two renderers: an SSE chunk of the given choices (`make(choices=..., usage=..., **more)`),
    with the usage so far under continuous_usage_stats, and the closing chunk of include_usage (no choices, the
    usage), None without it."""
    continuous = bool(options and options.continuous_usage_stats)

    def chunk(choices: list[Any], **more: Any) -> str:
        return sse(make(choices=choices, usage=usage() if continuous else None, **more))

    def closing() -> str:
        return sse(make(choices=[], usage=usage()))

    return chunk, closing if options and options.include_usage else None


def sse_response(outputs: AsyncIterator[tuple[ChoiceBuilder, str, SequenceOutput]], builders: list[ChoiceBuilder],
                  opening: list[str], delta: Callable[[ChoiceBuilder, str, int], str],
                  closing: Callable[[], str] | None) -> StreamingResponse:
    """An SSE stream: the opening chunks, one chunk per output that adds text, logprobs, routed experts or the finish
    reason (rendered by `delta`, given the text it adds and the first logprob entry not yet sent), the closing chunk
    (usage) if any, then [DONE]."""
    async def events() -> AsyncIterator[str]:
        for first in opening:
            yield first
        logprobs_sent = {b.index: 0 for b in builders}
        async for builder, text, _ in outputs:
            sent = logprobs_sent[builder.index]
            # builder.logprobs only fills when the request asked for logprobs.
            if (text or builder.finish_reason is not None or len(builder.logprobs) > sent or builder.prompt_pending
                    or builder.routed_pending):
                yield delta(builder, text, sent)
            logprobs_sent[builder.index] = len(builder.logprobs)
        if closing is not None:
            yield closing()
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def token_id_label(token_id: int) -> str:
    return f"token_id:{token_id}"


def field_in(message: str) -> str | None:
    """The field a SamplingParams error names (its messages start with the field name)."""
    word = message.split(" ", 1)[0].strip(":'\"")
    return word if word.isidentifier() else None



