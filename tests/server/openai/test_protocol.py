"""Tests for server/openai/protocol/: strict request validation, clear errors, response shapes."""

import json
import math
import subprocess
import sys
from typing import Any

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from pydantic import BaseModel, ValidationError

from server.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TopLogprob,
    UsageInfo,
    chat_template_input,
    describe_validation_error,
)

USER_HI = [{"role": "user", "content": "Hi"}]


def rejected(cls: type[BaseModel], body: Any, *, as_json: bool = False) -> tuple[str, str | None]:
    """The (message, param) a request body is rejected with."""
    with pytest.raises(ValidationError) as info:
        if as_json:
            cls.model_validate_json(json.dumps(body))
        else:
            cls.model_validate(body)
    return describe_validation_error(info.value)


# --- completions -------------------------------------------------------------------------------


def test_minimal_completion_request_defaults() -> None:
    req = CompletionRequest.model_validate({"prompt": "Hello"})
    assert req.model is None and req.prompts == ["Hello"]
    assert (req.max_tokens, req.temperature, req.top_p, req.n) == (16, 1.0, 1.0, 1)
    assert (req.top_k, req.min_p, req.repetition_penalty, req.min_tokens) == (0, 0.0, 1.0, 0)
    assert req.logprobs is None and not req.echo and not req.stream and req.stream_options is None
    assert req.stop_strings == [] and req.skip_special_tokens and not req.include_stop_str_in_output


def test_benchmark_client_body_is_accepted() -> None:
    body = {
        "model": "customllm", "prompt": "x" * 50, "temperature": 0.0, "max_tokens": 128,
        "ignore_eos": True, "stop": None, "logprobs": None, "best_of": 1, "repetition_penalty": 1.0,
        "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    parsed = [CompletionRequest.model_validate(body), CompletionRequest.model_validate_json(json.dumps(body))]
    for req in parsed:
        assert req.ignore_eos and req.stream_options is not None
        assert req.stream_options.include_usage and req.stream_options.continuous_usage_stats
        assert req.max_tokens == 128 and req.temperature == 0.0


def test_null_takes_the_default() -> None:
    req = CompletionRequest.model_validate(
        {"prompt": "x", "temperature": None, "top_p": None, "n": None, "max_tokens": None, "echo": None}
    )
    assert (req.temperature, req.top_p, req.n, req.max_tokens, req.echo) == (1.0, 1.0, 1, 16, False)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts == expected


def test_stop_and_logit_bias_forms() -> None:
    body = {"prompt": "x", "stop": "\n", "logit_bias": {"50": -100, "7": 2.5}}
    req = CompletionRequest.model_validate(body)
    assert req.stop_strings == ["\n"]
    assert req.logit_bias == {50: -100.0, 7: 2.5}
    req = CompletionRequest.model_validate_json('{"prompt": "x", "stop": ["a", "b"], "logit_bias": {"3": 1}}')
    assert req.stop_strings == ["a", "b"] and req.logit_bias == {3: 1.0}


COMPLETION_INVALID = [
    ("prompt", ""),
    ("prompt", []),
    ("prompt", 3),
    ("prompt", [""]),
    ("prompt", [[]]),
    ("prompt", [1, -1]),
    ("prompt", [1, "a"]),
    ("prompt", [True]),
    ("prompt", [1.5]),
    ("model", 5),
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", "16"),
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("temperature", "0.5"),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0),
    ("top_p", 1.5),
    ("n", 0),
    ("n", 17),
    ("stream", "yes"),
    ("stream", 1),
    ("stream_options", {"include_usage": "yes"}),
    ("stream_options", "usage"),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("echo", 1),
    ("stop", 5),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["a", 1]),
    ("stop", ["a"] * 17),
    ("stop", "x" * 257),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", [1, 2]),
    ("seed", 2**64),
    ("seed", "1"),
    ("user", 5),
    ("top_k", -2),
    ("min_p", 1.5),
    ("repetition_penalty", 0),
    ("min_tokens", -1),
    ("ignore_eos", "true"),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "2"),
    ("skip_special_tokens", 0),
    ("include_stop_str_in_output", "no"),
    ("best_of", 2),
    ("best_of", 0),
    ("suffix", "after"),
]


@pytest.mark.parametrize(("field", "value"), COMPLETION_INVALID)
def test_invalid_completion_field_is_named(field: str, value: Any) -> None:
    body = {"prompt": "x", field: value}
    message, param = rejected(CompletionRequest, body)
    assert param is not None and param.split(".")[0].split("[")[0] == field, (message, param)
    assert field in message, message


# NaN and infinity have no standard JSON spelling.
JSON_INVALID = [(f, v) for f, v in COMPLETION_INVALID if not isinstance(v, float) or math.isfinite(v)]


@pytest.mark.parametrize(("field", "value"), JSON_INVALID)
def test_invalid_completion_field_is_named_json(field: str, value: Any) -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", field: value}, as_json=True)
    assert param is not None and param.startswith(field) and field in message, (message, param)


def test_unknown_fields_are_named() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "frobnicate": 1})
    assert param == "frobnicate" and "frobnicate" in message and "Unrecognized" in message
    message, param = rejected(CompletionRequest, {"prompt": "x", "stream": True, "stream_options": {"x": 1}})
    assert param == "stream_options.x" and "stream_options.x" in message


def test_missing_prompt_is_named() -> None:
    message, param = rejected(CompletionRequest, {"max_tokens": 3})
    assert param == "prompt" and "prompt" in message


def test_stream_options_need_stream() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}})
    assert param == "stream_options" and "stream" in message
    ok = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate(ok).stream_options is not None


def test_min_tokens_must_not_exceed_max_tokens() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "max_tokens": 4, "min_tokens": 5})
    assert param == "min_tokens" and "max_tokens" in message
    assert CompletionRequest.model_validate({"prompt": "x", "max_tokens": 5, "min_tokens": 5}).min_tokens == 5


def test_max_tokens_zero_only_with_echo() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "max_tokens": 0})
    assert param == "max_tokens" and "echo" in message
    req = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert req.max_tokens == 0 and req.echo


def test_best_of_and_suffix_only_when_harmless() -> None:
    harmless = [{"best_of": None}, {"best_of": 1}, {"best_of": 3, "n": 3}, {"suffix": None}, {"suffix": ""}]
    for extra in harmless:
        CompletionRequest.model_validate({"prompt": "x", **extra})
    assert "not supported" in rejected(CompletionRequest, {"prompt": "x", "best_of": 4, "n": 2})[0]
    assert "not supported" in rejected(CompletionRequest, {"prompt": "x", "suffix": "}"})[0]


def test_error_message_counts_further_errors_and_shows_value() -> None:
    message, param = rejected(CompletionRequest, {"prompt": "x", "temperature": 9, "top_p": 9})
    assert param == "temperature" and "(got 9)" in message and "1 more error" in message


def test_body_that_is_not_an_object() -> None:
    message, param = rejected(CompletionRequest, ["prompt"])
    assert param is None and message.startswith("Invalid request body")
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(b'{"prompt": ')
    assert describe_validation_error(info.value)[0].startswith("Invalid request body: Invalid JSON")


# --- chat --------------------------------------------------------------------------------------


def test_minimal_chat_request() -> None:
    req = ChatCompletionRequest.model_validate({"messages": USER_HI})
    assert req.max_tokens_limit is None and not req.logprobs and req.top_logprobs is None
    assert chat_template_input(req.messages) == USER_HI


def test_chat_content_parts_and_name() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": parts}]}
    )
    assert chat_template_input(req.messages) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb"},
    ]


def test_max_completion_tokens_wins() -> None:
    body = {"messages": USER_HI, "max_tokens": 10, "max_completion_tokens": 20}
    assert ChatCompletionRequest.model_validate(body).max_tokens_limit == 20
    body = {"messages": USER_HI, "max_tokens": 10}
    assert ChatCompletionRequest.model_validate(body).max_tokens_limit == 10
    body = {"messages": USER_HI, "max_tokens": 10, "max_completion_tokens": 3, "min_tokens": 4}
    message, param = rejected(ChatCompletionRequest, body)
    assert param == "min_tokens" and "(3)" in message


def test_chat_logprobs() -> None:
    ok = ChatCompletionRequest.model_validate({"messages": USER_HI, "logprobs": True, "top_logprobs": 5})
    assert ok.logprobs and ok.top_logprobs == 5
    ChatCompletionRequest.model_validate({"messages": USER_HI, "top_logprobs": 0})
    message, param = rejected(ChatCompletionRequest, {"messages": USER_HI, "top_logprobs": 2})
    assert param == "top_logprobs" and "logprobs" in message


CHAT_INVALID = [
    ("messages", []),
    ("messages", "hi"),
    ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": None}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
    ("messages", [{"role": "user", "content": "x", "tool_calls": []}]),
    ("max_tokens", 0),
    ("max_completion_tokens", -5),
    ("logprobs", 1),
    ("top_logprobs", 21),
    ("response_format", {"type": "json_schema"}),
    ("response_format", {"type": "json_schema", "json_schema": {}}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}),
    ("response_format", {"type": "xml"}),
    ("structured_outputs", {"regex": "a", "choice": ["a"]}),
    ("structured_outputs", {}),
    ("structured_outputs", {"choice": []}),
    ("tools", [{"type": "function", "function": {"name": "f f"}}]),
    ("tools", [{"type": "retrieval", "function": {"name": "f"}}]),
    ("tools", [{"type": "function", "function": {"name": "f"}}] * 2),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "g"}}),
    ("tool_choice", "sometimes"),
    ("store", True),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("web_search_options", {}),
    ("return_hidden_states", True),
    ("continue_final_message", True),
    ("temperature", 3),
    ("n", 100),
    ("stop", [""]),
    ("top_k", -3),
    ("ignore_eos", "1"),
    ("functions", [{"name": "f"}]),
]


@pytest.mark.parametrize(("field", "value"), CHAT_INVALID)
def test_invalid_chat_field_is_named(field: str, value: Any) -> None:
    body = {"messages": USER_HI, field: value}
    message, param = rejected(ChatCompletionRequest, body)
    assert param is not None and param.split(".")[0].split("[")[0] == field, (message, param)
    assert field in message, message


def test_chat_message_errors_point_at_the_message() -> None:
    bad_part = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}
    message, param = rejected(ChatCompletionRequest, {"messages": [*USER_HI, bad_part]})
    assert param == "messages[1].content" and "image_url" in message


def test_harmless_tool_fields_and_text_format_are_accepted() -> None:
    body = {"messages": USER_HI, "tools": [], "tool_choice": "none", "response_format": {"type": "text"}}
    assert ChatCompletionRequest.model_validate(body).response_format is not None


# What OpenAI clients and routers add to requests; each is known, and accepted at these values.
HARMLESS_CHAT_FIELDS: dict[str, Any] = {
    "store": False, "metadata": {"trace": "1"}, "user": "u", "service_tier": "auto", "parallel_tool_calls": False,
    "modalities": ["text"], "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "prompt_cache_key": "k", "safety_identifier": "s", "verbosity": "medium",
    # vllm-router's additions, at their defaults
    "no_stop_trim": False, "return_hidden_states": False, "continue_final_message": False,
    "separate_reasoning": True, "stream_reasoning": True, "include_reasoning": True,
}


@pytest.mark.parametrize(("field", "value"), HARMLESS_CHAT_FIELDS.items())
def test_known_harmless_chat_field_is_accepted(field: str, value: Any) -> None:
    req = ChatCompletionRequest.model_validate({"messages": USER_HI, field: value})
    assert getattr(req, field) == value


@pytest.mark.parametrize("field", ["no_stop_trim", "return_hidden_states", "continue_final_message",
                                   "separate_reasoning", "stream_reasoning", "include_reasoning"])
def test_router_fields_are_known_on_completions(field: str) -> None:
    value = HARMLESS_CHAT_FIELDS[field]
    assert getattr(CompletionRequest.model_validate({"prompt": "x", field: value}), field) == value


def test_constraints_become_grammar_requests() -> None:
    def grammar(**fields: Any) -> Any:
        return ChatCompletionRequest.model_validate({"messages": USER_HI, **fields}).grammar_request()

    assert grammar() is None and grammar(response_format={"type": "text"}) is None
    assert grammar(response_format={"type": "json_object"}).source == '{"type": "object"}'
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    got = grammar(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert (got.kind, got.field) == ("json", "response_format.json_schema.schema")
    # The schema's own property order (b before a): keys are generated in it (issue 26.12).
    assert json.loads(got.source) == schema and got.source.index('"b"') < got.source.index('"a"')
    assert grammar(structured_outputs={"regex": "[ab]+"}).source == "[ab]+"
    assert json.loads(grammar(structured_outputs={"choice": ["x", "y"]}).source) == ["x", "y"]
    assert grammar(structured_outputs={"json": json.dumps(schema)}).source == got.source


def test_continue_final_message_needs_an_assistant_turn_without_generation_prompt() -> None:
    body = {"messages": [*USER_HI, {"role": "assistant", "content": "Hel"}], "continue_final_message": True,
            "add_generation_prompt": False}
    assert ChatCompletionRequest.model_validate(body).continue_final_message
    message, param = rejected(ChatCompletionRequest, {**body, "add_generation_prompt": True})
    assert param == "continue_final_message" and "add_generation_prompt" in message


def test_tool_messages_parse_and_render_input() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = {"messages": [*USER_HI, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "42"}]}
    req = ChatCompletionRequest.model_validate(body)
    rendered = chat_template_input(req.messages)
    assert rendered[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert rendered[2] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}


# --- tokenize / detokenize ---------------------------------------------------------------------


def test_tokenize_request_forms() -> None:
    assert TokenizeRequest.model_validate({"prompt": "hi"}).prompt == "hi"
    req = TokenizeRequest.model_validate({"messages": USER_HI, "add_generation_prompt": False})
    assert req.messages is not None and not req.add_generation_prompt
    for body in ({}, {"prompt": "x", "messages": USER_HI}):
        message, param = rejected(TokenizeRequest, body)
        assert param == "prompt" and "messages" in message
    message, param = rejected(TokenizeRequest, {"prompt": "x", "add_generation_prompt": True})
    assert param == "add_generation_prompt"
    assert rejected(TokenizeRequest, {"prompt": "x", "bogus": 1})[1] == "bogus"


def test_detokenize_request() -> None:
    assert DetokenizeRequest.model_validate({"tokens": [1, 2]}).tokens == [1, 2]
    assert DetokenizeRequest.model_validate({"tokens": []}).tokens == []
    for tokens in ([-1], ["1"], "12", None):
        message, param = rejected(DetokenizeRequest, {"tokens": tokens})
        assert param is not None and param.startswith("tokens") and "tokens" in message


# --- responses ---------------------------------------------------------------------------------


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
