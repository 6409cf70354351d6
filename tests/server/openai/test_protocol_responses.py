"""Response shapes of server/openai/protocol/ (completion, chat, chunks, models, errors) as the openai types parse
them; the protocol package imports no torch."""

import json
import subprocess
import sys
from typing import Any

import openai.types as oai
import openai.types.chat as oai_chat

from server.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    UsageInfo,
)


def test_completion_response_matches_openai_types() -> None:
    logprobs = CompletionLogprobs(
        tokens=["He", "llo"], token_logprobs=[-1.5, float("-inf")],
        top_logprobs=[{"He": -1.5}, {"llo": -0.1}], text_offset=[0, 2],
    )
    resp = CompletionResponse(
        model="customllm",
        choices=[CompletionChoice(index=0, text="Hello", logprobs=logprobs, finish_reason="length")],
        usage=UsageInfo.of(3, 2),
    )
    body = json.loads(resp.model_dump_json())
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-1.5, -9999.0]  # -inf is not JSON
    parsed = oai.Completion.model_validate(body)
    assert parsed.choices[0].text == "Hello" and parsed.usage is not None


def test_completion_stream_chunk() -> None:
    chunk = CompletionStreamResponse(id="cmpl-1", model="m", choices=[CompletionChoice(index=0, text="He")])
    body = json.loads(chunk.model_dump_json())
    assert body["usage"] is None and body["choices"][0]["finish_reason"] is None
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "He"
    # An echoed prompt's first token has no logprob: null, as OpenAI sends it.
    echo = CompletionLogprobs(tokens=["A"], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    dumped = json.loads(CompletionChoice(index=0, text="A", logprobs=echo).model_dump_json())
    assert dumped["logprobs"]["token_logprobs"] == [None]


def test_chat_response_matches_openai_types() -> None:
    top = [TopLogprob(token="Hi", logprob=-0.5, bytes=[72, 105])]
    entry = ChatCompletionLogprob(token="Hi", logprob=-0.5, bytes=[72, 105], top_logprobs=top)
    resp = ChatCompletionResponse(
        model="m",
        choices=[
            ChatCompletionChoice(
                index=0, message=ChatResponseMessage(content="Hi"),
                logprobs=ChatChoiceLogprobs(content=[entry]), finish_reason="stop", stop_reason=2,
            )
        ],
        usage=UsageInfo.of(5, 1),
    )
    body = json.loads(resp.model_dump_json())
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi"}
    parsed = oai_chat.ChatCompletion.model_validate(body)
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content is not None
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].bytes == [72, 105]


def test_chat_chunk_deltas_leave_out_absent_keys() -> None:
    def chunk(delta: DeltaMessage, finish: Any = None, usage: UsageInfo | None = None) -> dict[str, Any]:
        choice = ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)
        response = ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[choice], usage=usage)
        body = json.loads(response.model_dump_json())
        oai_chat.ChatCompletionChunk.model_validate(body)
        return body

    first = chunk(DeltaMessage(role="assistant", content=""))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(DeltaMessage(content="x"))["choices"][0]["delta"] == {"content": "x"}
    last = chunk(DeltaMessage(), finish="stop", usage=UsageInfo.of(1, 1))
    assert last["choices"][0]["delta"] == {} and last["usage"]["total_tokens"] == 2


def test_model_list_and_error_shapes() -> None:
    body = json.loads(ModelList(data=[ModelCard(id="customllm", max_model_len=4096)]).model_dump_json())
    assert body["object"] == "list" and body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == 4096
    oai.Model.model_validate(body["data"][0])
    error = ErrorResponse.of("bad temperature", param="temperature", code=400).model_dump()
    assert error["error"] == {
        "message": "bad temperature", "type": "invalid_request_error", "param": "temperature", "code": 400
    }


def test_protocol_does_not_import_torch() -> None:
    code = "import sys, server.openai.protocol; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
