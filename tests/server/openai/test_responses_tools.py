"""/v1/responses with structured output, function tools and the OpenAI Agents SDK's default (Responses) model, over
real HTTP on the closing-biased tiny checkpoint (tests/server/openai/biased.py), whose outputs end soon."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from server.openai.protocol import GrammarRequest
from server.openai.protocol.responses import ResponsesRequest
from tests.server.live import LiveServer
from tests.server.openai.biased import biased_checkpoint, oai, server  # noqa: F401  (fixtures)
from tests.server.openai.responses_helpers import R, stable, stream_events


class City(BaseModel):
    name: str
    population: int


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": False}}


def test_parse_with_a_pydantic_text_format(oai: openai.OpenAI) -> None:
    for seed in range(3):
        resp = oai.responses.parse(model="customllm", input="A city?", text_format=City, max_output_tokens=150,
                                   extra_body={"seed": seed})
        assert resp.status == "completed", resp
        assert isinstance(resp.output_parsed, City)
        assert City.model_validate_json(resp.output_text) == resp.output_parsed


def test_json_schema_format_keys_come_in_the_schema_order(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "r", "strict": True, "schema": schema}
    resp = http.post(R, json={"input": "Why?", "text": {"format": fmt}, "max_output_tokens": 100, "seed": 1}).json()
    text = resp["output"][0]["content"][0]["text"]
    assert list(json.loads(text)) == ["reasoning", "answer"], text


def test_json_object_format(http: httpx.Client) -> None:
    resp = http.post(R, json={"input": "JSON please", "text": {"format": {"type": "json_object"}},
                              "max_output_tokens": 100, "seed": 1}).json()
    assert resp["status"] == "completed" and isinstance(json.loads(resp["output"][0]["content"][0]["text"]), dict)
    assert resp["text"]["format"] == {"type": "json_object"}


def test_logprobs_of_a_completed_response_are_its_texts_tokens(http: httpx.Client) -> None:
    body = {"input": "JSON please", "text": {"format": {"type": "json_object"}}, "max_output_tokens": 100, "seed": 1,
            "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    whole = http.post(R, json=body).json()
    assert whole["status"] == "completed"
    [part] = whole["output"][0]["content"]
    # The EOS that ended it adds no text, so no delta carries it and neither do the done event and the output.
    assert len(part["logprobs"]) == whole["usage"]["output_tokens"] - 1
    assert "".join(e["token"] for e in part["logprobs"]) == part["text"]
    events = stream_events(http, **body)
    deltas = [e for name, data in events if name == "response.output_text.delta" for e in data["logprobs"]]
    done = dict(events)["response.output_text.done"]["logprobs"]
    assert deltas == done == events[-1][1]["response"]["output"][0]["content"][0]["logprobs"] == part["logprobs"]


def test_sdk_stream_final_response_equals_the_unstreamed(oai: openai.OpenAI, http: httpx.Client) -> None:
    kwargs: dict[str, Any] = dict(model="customllm", input="A city?", text_format=City, max_output_tokens=150,
                                  extra_body={"seed": 11})
    whole = oai.responses.parse(**kwargs)
    with oai.responses.stream(**kwargs) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and types[-1] == "response.completed"
    assert final.status == whole.status == "completed" and final.output_parsed == whole.output_parsed
    # warnings=False: the SDK's parsed models warn when dumped (their `parsed` field is typed None).
    assert stable(final.model_dump(mode="json", warnings=False)) == stable(whole.model_dump(mode="json",
                                                                                            warnings=False))


def test_required_tool_call_then_its_output_round_trip(oai: openai.OpenAI, http: httpx.Client) -> None:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = oai.responses.create(model="customllm", input=question, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                 tool_choice="required", parallel_tool_calls=False, max_output_tokens=150,
                                 extra_body={"seed": 3})
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id is not None and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name in ("get_weather", "get_time") and json.loads(call.arguments)
    # The call goes back as the SDK dumps it, with its result.
    items = [*question, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    second = oai.responses.create(model="customllm", input=items, tools=[WEATHER, TIME],  # type: ignore[arg-type]
                                  max_output_tokens=20)
    assert second.status in ("completed", "incomplete") and second.output[0].type == "message"
    # The prompt is chat's rendering of the same conversation: the call in an assistant turn, its result a tool turn.
    chat = [*question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                  for t in (WEATHER, TIME)]
    tokens = http.post("/tokenize", json={"messages": chat, "tools": chat_tools}).json()["tokens"]
    assert second.usage is not None and second.usage.input_tokens == len(tokens)
    text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "<tool_response>\nsunny\n</tool_response>" in text and f'"name": "{call.name}"' in text


def test_named_tool_call_streams_argument_events(http: httpx.Client) -> None:
    body = {"input": "Weather?", "tools": [WEATHER, TIME], "tool_choice": {"type": "function", "name": "get_time"},
            "max_output_tokens": 150, "seed": 5}
    whole = http.post(R, json=body).json()
    events = stream_events(http, **body)
    names = [name for name, _ in events]
    deltas = names.count("response.function_call_arguments.delta")
    assert deltas >= 1 and names == ["response.created", "response.in_progress", "response.output_item.added"] + [
        "response.function_call_arguments.delta"] * deltas + ["response.function_call_arguments.done",
                                                             "response.output_item.done", "response.completed"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    done = dict(events)["response.function_call_arguments.done"]
    arguments = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    assert done["name"] == "get_time" and done["arguments"] == arguments == whole["output"][0]["arguments"]
    assert set(json.loads(arguments)) == {"zone"}
    assert stable(events[-1][1]["response"]) == stable(whole)


# tool_choice "auto" parses what the model writes; a grammar (vLLM's structured_outputs is not a Responses field, so
# text.format's schema) cannot force text here, so this checks that free text stays a message.
def test_auto_without_a_call_is_a_message(http: httpx.Client) -> None:
    resp = http.post(R, json={"input": "Hi", "tools": [TIME], "max_output_tokens": 5, "seed": 1}).json()
    assert [item["type"] for item in resp["output"]] == ["message"]
    assert resp["tool_choice"] == "auto" and resp["tools"][0]["name"] == "get_time"


TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
MALFORMED = 'Checking. <tool_call>{"name": "get_time", "arguments": {"zone": </tool_call>'


@pytest.mark.parametrize(("text", "parallel", "want"), [
    (f"{TIME_CALL}\n{WEATHER_CALL}", False, [("function_call", "get_time")]),
    (f"{TIME_CALL}\n{WEATHER_CALL}", True, [("function_call", "get_time"), ("function_call", "get_weather")]),
    (MALFORMED, True, [("message", MALFORMED)]),
])
def test_auto_calls_parsed_from_the_text(http: httpx.Client, monkeypatch: pytest.MonkeyPatch, text: str,
                                         parallel: bool, want: list[tuple[str, str]]) -> None:
    # structured_outputs is no Responses field: the request's constraint is replaced to make the model write `text`.
    monkeypatch.setattr(ResponsesRequest, "grammar_request",
                        lambda self: GrammarRequest("grammar", f"start: {json.dumps(text)}", "text.format"))
    body = {"input": "Weather?", "tools": [WEATHER, TIME], "parallel_tool_calls": parallel, "max_output_tokens": 80}
    whole = http.post(R, json=body).json()
    got = [(i["type"], i["name"] if i["type"] == "function_call" else i["content"][0]["text"]) for i in whole["output"]]
    assert whole["status"] == "completed" and got == want
    events = stream_events(http, **body)
    assert stable(events[-1][1]["response"]) == stable(whole)
    assert sum(name == "response.output_item.added" for name, _ in events) == len(want)


BAD_TOOLS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [TIME], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "frob"}}]}, "tools"),
    ({"tools": [TIME, TIME]}, "tools"),
    ({"tools": [TIME], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
     "input[0].output[0].type"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_TOOLS)
def test_bad_tools_are_400(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    from tests.server.sse import assert_error

    assert_error(http.post(R, json={"input": "Hi"} | fields), 400, param)


def _agents_client(server: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)


def test_openai_agents_default_model_plain_run(server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    # The biased model mostly ends at once; a seed keeps the run replayable and under max_tokens.
    agent = Agent(name="a", instructions="Be brief.",
                  model_settings=ModelSettings(max_tokens=400, extra_body={"seed": 3}),
                  model=OpenAIResponsesModel(model="customllm", openai_client=_agents_client(server)))
    result: Any = Runner.run_sync(agent, "Hello?", max_turns=1)
    assert isinstance(result.final_output, str)
    [response] = result.raw_responses
    assert response.usage.input_tokens > 0 and response.response_id.startswith("resp_")


def test_openai_agents_default_model_output_type(server: LiveServer) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    # output_type makes the Agents SDK send text.format json_schema (strict), which the grammar enforces.
    agent = Agent(name="a", output_type=City, model_settings=ModelSettings(max_tokens=200, extra_body={"seed": 1}),
                  model=OpenAIResponsesModel(model="customllm", openai_client=_agents_client(server)))
    result: Any = Runner.run_sync(agent, "A city?", max_turns=1)
    assert isinstance(result.final_output, City)


@pytest.mark.parametrize("streamed", [False, True])
def test_openai_agents_default_model_function_tool(server: LiveServer, streamed: bool) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIProvider,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Get the weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    # The provider's model for a name, as an agent given model="customllm" gets it: the Responses model.
    model = OpenAIProvider(openai_client=_agents_client(server)).get_model("customllm")
    assert isinstance(model, OpenAIResponsesModel)
    # The first turn calls the tool (forced); the second sends the call and its output back and gets text
    # (tool_choice is reset after a tool use, the Agents SDK's default), ending the run. The seed keeps the second
    # turn's free text short of max_tokens (an incomplete response fails an agent run).
    agent = Agent(name="a", instructions="Use the tool.", tools=[weather], model=model,
                  model_settings=ModelSettings(tool_choice="required", max_tokens=200, extra_body={"seed": 3}))
    if streamed:
        async def run() -> Any:
            result = Runner.run_streamed(agent, "Weather in Oslo?", max_turns=3)
            kinds = {event.type async for event in result.stream_events()}
            assert "raw_response_event" in kinds
            return result
        result: Any = asyncio.run(run())
    else:
        result = Runner.run_sync(agent, "Weather in Oslo?", max_turns=3)
    assert len(calls) == 1 and isinstance(result.final_output, str)
    assert len(result.raw_responses) == 2
