"""Chat requests of server/openai/protocol/: messages, limits, logprobs, known fields, constraints and tool turns."""

import json
from typing import Any

import pytest

from server.openai.protocol import ChatCompletionRequest, CompletionRequest, chat_template_input
from tests.server.openai.protocol_helpers import USER_HI, rejected


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
