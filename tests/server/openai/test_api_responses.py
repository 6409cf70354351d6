"""POST /v1/responses over real HTTP on the tiny checkpoint: the openai SDK's create and stream, the same text as chat
for the same conversation, the stream's events in order, every refused field a 400, the limits, metrics and client
disconnects. Structured output, tools and the Agents SDK: test_responses_tools.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from server.tokenizer import Tokenizer
from tests.server.live import LiveServer, engine_held_after
from tests.server.openai.ops_helpers import idle, wait_for
from tests.server.openai.responses_helpers import R, respond, stable, stream_events
from tests.server.sse import assert_error, iter_sse

MAX_MODEL_LEN = 512  # the tiny checkpoint's max_position_embeddings
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about printing."}]
ORDER = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
         "response.output_text.delta", "response.output_text.done", "response.content_part.done",
         "response.output_item.done"]


def test_sdk_create_gives_the_text_chat_gives(oai: openai.OpenAI, http: httpx.Client, tok: Tokenizer) -> None:
    resp = oai.responses.create(model="customllm", instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"],
                                max_output_tokens=10, temperature=0, metadata={"k": "v"}, store=False)
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 10, "temperature": 0}).json()
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "customllm"
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert message.id.startswith("msg_") and [c.type for c in message.content] == ["output_text"]
    assert resp.output_text == chat["choices"][0]["message"]["content"] and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens == 10
    assert resp.usage.input_tokens == len(tok.encode_chat(MESSAGES)) == chat["usage"]["prompt_tokens"]
    assert resp.usage.total_tokens == resp.usage.input_tokens + 10
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    assert resp.metadata == {"k": "v"} and resp.instructions == "You are terse." and resp.max_output_tokens == 10


def test_stream_events_in_order_and_the_final_response_equals_the_unstreamed(http: httpx.Client) -> None:
    body = {"input": "Tell me a story.", "max_output_tokens": 12, "seed": 7, "temperature": 1.0}
    whole = respond(http, **body)
    events = stream_events(http, **body)
    names = [name for name, _ in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    deltas = names.count("response.output_text.delta")
    assert deltas >= 1 and names == ORDER[:5] + ["response.output_text.delta"] * (deltas - 1) + ORDER[5:] + [
        "response.incomplete"]
    created, final = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == final["id"]
    assert stable(final) == stable(whole)
    text = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    done = dict(events)
    assert text == done["response.output_text.done"]["text"] == whole["output"][0]["content"][0]["text"]
    assert done["response.output_item.done"]["item"] == final["output"][0]
    item_id = final["output"][0]["id"]
    assert all(data["item_id"] == item_id for name, data in events if "text" in name or "content_part" in name)


def test_sdk_stream_accumulates_the_text(oai: openai.OpenAI, http: httpx.Client) -> None:
    whole = respond(http, input="Hi", max_output_tokens=6, temperature=0)
    with oai.responses.stream(model="customllm", input="Hi", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == whole["output"][0]["content"][0]["text"]
    text_done = [e for e in events if e.type == "response.output_text.done"]
    assert len(text_done) == 1 and text_done[0].text == events[-1].response.output_text


def test_input_items_render_as_the_chat_conversation(http: httpx.Client) -> None:
    # The SDK's forms: typed messages with input_text parts, an earlier answer's output message sent back.
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
             {"role": "user", "content": "Hi"},
             {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]},
             {"role": "user", "content": [{"type": "input_text", "text": "More?"}]}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]
    resp = respond(http, input=items, max_output_tokens=5, temperature=0)
    reply = http.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 5, "temperature": 0}).json()
    assert resp["usage"]["input_tokens"] == reply["usage"]["prompt_tokens"]
    assert resp["output"][0]["content"][0]["text"] == reply["choices"][0]["message"]["content"]


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"include": ["message.output_text.logprobs"], "tools": [{"type": "function", "name": "f"}]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f", "bogus": 1}]}, "tools[0].bogus"),
    ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "extra": 1}]}]},
     "input[0].content[0].extra"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frob"}}}}, "text.format.schema"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"temperature": 3}, "temperature"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"model": "gpt-5"}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), REFUSED)
def test_refused_fields_are_400_naming_the_field(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    status = 404 if param == "model" else 400
    error = assert_error(http.post(R, json={"input": "Hi", "max_output_tokens": 2} | fields), status, param)
    assert param.split("[")[0].split(".")[0] in error["message"] or status == 404 or "type" in param


def test_logprobs_are_chats(oai: openai.OpenAI, http: httpx.Client) -> None:
    body = {"input": MESSAGES[1]["content"], "instructions": MESSAGES[0]["content"], "max_output_tokens": 6,
            "temperature": 0, "include": ["message.output_text.logprobs"], "top_logprobs": 3}
    [part] = respond(http, **body)["output"][0]["content"]
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                                                   "logprobs": True, "top_logprobs": 3}).json()["choices"][0]
    assert part["logprobs"] == chat["logprobs"]["content"] and len(part["logprobs"]) == 6
    assert "".join(e["token"] for e in part["logprobs"]) == part["text"]
    assert all(len(e["top_logprobs"]) == 3 for e in part["logprobs"])
    events = stream_events(http, **body)
    deltas = [e for name, data in events if name == "response.output_text.delta" for e in data["logprobs"]]
    assert deltas == dict(events)["response.output_text.done"]["logprobs"] == part["logprobs"]
    # The SDK's types read them (and the Agents SDK asks for them this way, with ModelSettings.top_logprobs).
    resp = oai.responses.create(model="customllm", input="Hi", max_output_tokens=3, temperature=0,
                                include=["message.output_text.logprobs"], top_logprobs=2)
    logprobs = resp.output[0].content[0].logprobs  # type: ignore[union-attr]
    assert logprobs is not None and len(logprobs) == 3 and len(logprobs[0].top_logprobs) == 2
    assert respond(http, input="Hi", max_output_tokens=3)["output"][0]["content"][0]["logprobs"] == []


def test_what_the_sdks_send_by_default_is_accepted(http: httpx.Client) -> None:
    # The Agents SDK always sends include (empty) and tools (empty); other fields are accepted at no-op values.
    body = {"input": "Hi", "max_output_tokens": 2, "include": [], "tools": [], "store": False, "truncation": "disabled",
            "reasoning": {"effort": "low", "summary": None}, "prompt_cache_key": "k", "user": "u", "background": False,
            "text": {"format": {"type": "text"}, "verbosity": "low"}, "service_tier": "auto", "top_logprobs": 0,
            "safety_identifier": "s", "parallel_tool_calls": True, "tool_choice": "auto"}
    resp = respond(http, **body)
    assert resp["store"] is False and resp["user"] == "u" and resp["prompt_cache_key"] == "k"
    assert resp["text"] == {"format": {"type": "text"}, "verbosity": "low"}
    assert resp["reasoning"] == {"effort": "low", "summary": None, "generate_summary": None}


def test_limits_apply(http: httpx.Client) -> None:
    assert_error(http.post(R, json={"input": "Hi", "max_output_tokens": MAX_MODEL_LEN}), 400, "max_output_tokens")
    assert_error(http.post(R, json={"input": "Hi", "max_output_tokens": 0}), 400, "max_output_tokens")
    long_input = "hello " * MAX_MODEL_LEN
    error = assert_error(http.post(R, json={"input": long_input}), 400, "input")
    assert str(MAX_MODEL_LEN) in error["message"]
    assert_error(http.post(R, json={"input": long_input, "stream": True}), 400, "input")  # before any event
    for fields, param in (({"input": [{"role": "user", "content": "\ud800"}]}, "input[0].content"),
                          ({"input": "Hi", "instructions": "\udfff"}, "instructions"),
                          ({"input": "Hi", "tools": [{"type": "function", "name": "f", "description": "\ud800"}]},
                           "tools[0].description"),
                          ({"input": "Hi", "tools": [{"type": "function", "name": "f", "parameters": {
                              "type": "object", "properties": {"\ud800": {}}}}]}, "input")):
        # json.dumps escapes the lone surrogate as JSON allows ("\\ud800"); httpx's json= cannot encode it.
        assert_error(http.post(R, content=json.dumps(fields), headers={"Content-Type": "application/json"}), 400,
                     param)
    assert_error(http.post(R, content=b'{"input": "' + b"a" * (1 << 20) + b'"}',
                           headers={"Content-Type": "application/json"}), 413, "body")
    # Without max_output_tokens, the output may fill the rest of the context.
    resp = respond(http, input="Hi", temperature=0)
    assert resp["usage"]["total_tokens"] <= MAX_MODEL_LEN


def test_requests_are_counted_in_metrics(server: LiveServer, http: httpx.Client) -> None:
    labels = {"route": R, "status": "200"}
    before, bad = server.metric("customllm_http_requests_total", labels), server.metric(
        "customllm_http_requests_total", {"route": R, "status": "400"})
    lengths = server.metric("customllm_request_success_total", {"finish_reason": "length"})
    respond(http, input="Hi", max_output_tokens=3)
    stream_events(http, input="Hi", max_output_tokens=3)
    http.post(R, json={"input": "Hi", "store": True})
    assert server.metric("customllm_http_requests_total", labels) == before + 2
    assert server.metric("customllm_http_requests_total", {"route": R, "status": "400"}) == bad + 1
    assert server.metric("customllm_request_success_total", {"finish_reason": "length"}) == lengths + 2


def test_disconnect_mid_stream_aborts_the_request(server: LiveServer) -> None:
    wait_for(lambda: idle(server), what="idle before the request")
    aborts = server.metric("customllm_request_success_total", {"finish_reason": "abort"})
    body = {"input": "Tell me everything.", "max_output_tokens": 400, "stream": True}
    # The engine waits after 8 steps until the client has gone, so the request is running when it leaves; the
    # server notices when it next writes to the closed connection.
    with engine_held_after(server, 8), httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", R, json=body) as response:
        events = iter_sse(response)
        for _ in range(5):
            next(events)
        assert server.metric("customllm_num_requests_running") == 1
    wait_for(lambda: idle(server), timeout=2.0, what="running 0 and cache usage 0 after the disconnect")
    assert server.metric("customllm_request_success_total", {"finish_reason": "abort"}) == aborts + 1
