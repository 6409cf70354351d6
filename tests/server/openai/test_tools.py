"""Tool calling on chat completions over real HTTP: forced calls ("required", a named function) through the
grammar, calls parsed from generated text ("auto"), streaming deltas as the openai SDK accumulates them, tool turns
in the prompt, and 400s for bad tools. On the closing-biased tiny checkpoint (tests/server/openai/biased.py)."""

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.server.openai.biased import biased_checkpoint, oai, server  # noqa: F401  (fixtures)
from tests.server.sse import assert_error, stream_chunks

H = "/v1/chat/completions"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class GetWeather(BaseModel):
    city: str
    days: int


WEATHER = openai.pydantic_function_tool(GetWeather, name="get_weather")
TIME = {"type": "function", "function": {"name": "get_time", "description": "the time in a zone",
                                          "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                         "required": ["zone"], "additionalProperties": False}}}


def test_required_tool_call_validates_against_its_schema(oai: openai.OpenAI) -> None:
    for seed in range(3):
        completion = oai.chat.completions.create(model="customllm", messages=USER, tools=[WEATHER, TIME],
                                                 tool_choice="required", parallel_tool_calls=False, seed=seed,
                                                 max_tokens=150)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        call = calls[0].function
        if call.name == "get_weather":
            GetWeather.model_validate_json(call.arguments)
        else:
            assert call.name == "get_time" and set(json.loads(call.arguments)) == {"zone"}


def test_named_tool_choice_streams_deltas_the_sdk_accumulates(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model="customllm", messages=USER, tools=[WEATHER, TIME], seed=5, max_tokens=150,
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = oai.chat.completions.create(**kwargs).choices[0]
    with oai.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert final.message.tool_calls and whole.message.tool_calls
    got, want = final.message.tool_calls[0].function, whole.message.tool_calls[0].function
    assert (got.name, got.arguments) == (want.name, want.arguments) and got.name == "get_weather"
    assert isinstance(got.parsed_arguments, GetWeather)  # the SDK parsed the accumulated arguments


def test_stream_delta_shape(http: httpx.Client) -> None:
    body = {"messages": USER, "tools": [TIME], "tool_choice": "required", "seed": 1, "max_tokens": 100,
            "stream": True}
    deltas = []
    with http.stream("POST", H, json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas += choice["delta"].get("tool_calls") or []
                finish = choice["finish_reason"]
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_time"
    assert rest and all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
    assert set(json.loads(first["function"]["arguments"] + "".join(d["function"]["arguments"] for d in rest))) == {
        "zone"}


# tool_choice "auto" parses whatever the model writes; here a grammar makes this tiny model write a call.
FORCED_TEXT = {"grammar": 'start: "I will check. <tool_call>\\n{\\"name\\": \\"get_time\\", \\"arguments\\": '
                          '{\\"zone\\": \\"" /[A-Z]{3}/ "\\"}}\\n</tool_call>"'}


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_calls_from_the_text(oai: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model="customllm", messages=USER, tools=[TIME], seed=2, max_tokens=60,
                                  extra_body={"structured_outputs": FORCED_TEXT})
    if stream:
        with oai.chat.completions.stream(**kwargs) as s:
            choice = s.get_final_completion().choices[0]
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check."
    call = (choice.message.tool_calls or [])[0].function
    assert call.name == "get_time" and len(json.loads(call.arguments)["zone"]) == 3


def test_without_tools_in_play_the_text_is_content(http: httpx.Client) -> None:
    body = {"messages": USER, "tools": [TIME], "tool_choice": "none", "max_tokens": 60, "seed": 2,
            "structured_outputs": FORCED_TEXT}
    choice = http.post(H, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and "<tool_call>" in choice["message"]["content"]
    assert "tool_calls" not in choice["message"]


def test_tool_turns_render_hermes_style(http: httpx.Client) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [{"role": "system", "content": "Be brief."}, *USER,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    tokens = http.post("/tokenize", json={"messages": messages, "tools": [TIME]}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TIME) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' \
           '<|im_end|>\n' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    # The chat endpoint renders the same prompt.
    usage = http.post(H, json={"messages": messages, "tools": [TIME], "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == len(tokens)


BAD_TOOLS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ({"tools": [TIME, TIME]}, "tools"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_TOOLS)
def test_bad_tools_are_400_naming_the_field(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    assert_error(http.post(H, json={"messages": USER, **fields}), 400, param)
    ok = http.post(H, json={"messages": USER, "tools": [TIME], "tool_choice": "required", "max_tokens": 80})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["tool_calls"]


PING = {"type": "function", "function": {"name": "ping", "description": "no params"}}  # any object as arguments
PING_EMPTY = {"type": "function", "function": {"name": "ping", "parameters": {  # only {} as arguments
    "type": "object", "properties": {}, "additionalProperties": False}}}
PING_CHOICES: list[Any] = ["required", {"type": "function", "function": {"name": "ping"}}]


def _whole_and_streamed(oai: openai.OpenAI, **kwargs: Any) -> tuple[Any, Any]:
    """The unstreamed choice and the openai SDK's final completion of the same request streamed."""
    kwargs = dict(model="customllm", messages=USER, temperature=0, max_tokens=60) | kwargs
    whole = oai.chat.completions.create(**kwargs).choices[0]
    with oai.chat.completions.stream(**kwargs) as stream:
        return whole, stream.get_final_completion().choices[0]


def _calls(choice: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]


def _tool_call_entries(http: httpx.Client, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The tool_calls entries of each chunk of a streamed chat request."""
    chunks = stream_chunks(http, H, {"messages": USER, "temperature": 0, "max_tokens": 60} | body | {"stream": True})
    return [c["choices"][0]["delta"].get("tool_calls") or [] for c in chunks if c["choices"]]


@pytest.mark.parametrize("tool", [PING, PING_EMPTY])
@pytest.mark.parametrize("tool_choice", PING_CHOICES)
def test_a_call_without_parameters_streams_as_one_call(oai: openai.OpenAI, http: httpx.Client, tool: dict[str, Any],
                                                       tool_choice: Any) -> None:
    whole, final = _whole_and_streamed(oai, tools=[tool], tool_choice=tool_choice)
    assert [name for name, _ in _calls(whole)] == ["ping"] and _calls(final) == _calls(whole)
    assert tool is PING or _calls(whole) == [("ping", "{}")]
    for entries in _tool_call_entries(http, {"tools": [tool], "tool_choice": tool_choice}):
        indexes = [e["index"] for e in entries]
        assert len(indexes) == len(set(indexes)), entries  # OpenAI sends at most one entry per call in a chunk


def _forced_text(text: str) -> dict[str, Any]:
    """structured_outputs making the model write exactly `text` (tool_choice "auto" then parses it)."""
    return {"structured_outputs": {"grammar": f"start: {json.dumps(text)}"}}


PING_CALL = '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'


def test_auto_call_without_parameters_streams_as_one_call(oai: openai.OpenAI, http: httpx.Client) -> None:
    whole, final = _whole_and_streamed(oai, tools=[PING], extra_body=_forced_text(PING_CALL))
    assert _calls(whole) == [("ping", "{}")] and _calls(final) == _calls(whole)
    for entries in _tool_call_entries(http, {"tools": [PING]} | _forced_text(PING_CALL)):
        assert len(entries) <= 1, entries


@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_tool_calls_false_returns_the_first_call(oai: openai.OpenAI, parallel: bool) -> None:
    text = f"{TIME_CALL}\n{PING_CALL}"
    whole, final = _whole_and_streamed(oai, tools=[TIME, PING], parallel_tool_calls=parallel,
                                       extra_body=_forced_text(text))
    want = [("get_time", '{"zone": "UTC"}'), ("ping", "{}")]
    assert _calls(whole) == (want if parallel else want[:1]) and _calls(final) == _calls(whole)
    assert whole.finish_reason == final.finish_reason == "tool_calls"


def test_a_block_that_does_not_parse_is_content(oai: openai.OpenAI, http: httpx.Client) -> None:
    text = 'Checking. <tool_call>{"name": "get_time", "arguments": {"zone": </tool_call>'
    whole, final = _whole_and_streamed(oai, tools=[TIME], extra_body=_forced_text(text))
    for choice in (whole, final):
        assert choice.finish_reason == "stop" and choice.message.content == text and not choice.message.tool_calls
    assert not any(_tool_call_entries(http, {"tools": [TIME]} | _forced_text(text)))  # not even a call's name
