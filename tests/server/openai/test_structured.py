"""Constrained output over real HTTP: response_format and structured_outputs (json, regex, choice, grammar), on a
tiny checkpoint biased towards closing tokens (see tests/server/openai/biased.py)."""

import asyncio
import json
import re
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.openai.biased import biased_checkpoint, oai, server  # noqa: F401  (fixtures)
from tests.server.sse import assert_error

C, H = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "user", "guest"]
    tags: list[str]
    active: bool


def still_serving(http: httpx.Client) -> None:
    response = http.post(C, json={"prompt": "still there?", "max_tokens": 2, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_sdk_parse_with_a_pydantic_model(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.parse(model="customllm", messages=USER, response_format=Person,
                                            max_completion_tokens=200, seed=1)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_schema_output_is_compact_and_valid_for_many_seeds(http: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                  "schema": Person.model_json_schema()}}
    for seed in range(4):
        body = http.post(H, json={"messages": USER, "response_format": fmt, "max_tokens": 200, "seed": seed}).json()
        text = body["choices"][0]["message"]["content"]
        Person.model_validate_json(text)
        assert json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) == text  # no whitespace


def test_json_object_is_an_object(http: httpx.Client) -> None:
    body = http.post(H, json={"messages": USER, "response_format": {"type": "json_object"}, "max_tokens": 100,
                              "seed": 3}).json()
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", [C, H])
def test_regex_output_fullmatches(http: httpx.Client, path: str) -> None:
    pattern = r"[a-c]{3}-[0-9]{2,4}"
    base: dict[str, Any] = {"prompt": "id:"} if path == C else {"messages": USER}
    body = http.post(path, json={**base, "structured_outputs": {"regex": pattern}, "max_tokens": 30, "n": 3,
                                 "temperature": 1.0, "seed": 5}).json()
    for choice in body["choices"]:
        text = choice["text"] if path == C else choice["message"]["content"]
        assert re.fullmatch(pattern, text), text


def test_choice_output_is_in_the_set_for_every_sample(http: httpx.Client) -> None:
    choices = ["red", "green", "blue", "dark blue"]
    body = http.post(C, json={"prompt": "colour:", "structured_outputs": {"choice": choices}, "n": 8,
                              "max_tokens": 10, "seed": 11}).json()
    texts = [c["text"] for c in body["choices"]]
    assert all(t in choices for t in texts), texts
    assert len(set(texts)) > 1, texts  # each sample has its own matcher and draws


def test_lark_and_gbnf_grammars(http: httpx.Client) -> None:
    lark = 'start: "id-" /[0-9]{3}/ ("!" | "?")'
    gbnf = 'root ::= "id-" [0-9] [0-9] [0-9] ("!" | "?")'
    for grammar in (lark, gbnf):
        body = http.post(C, json={"prompt": "x", "structured_outputs": {"grammar": grammar}, "max_tokens": 20,
                                  "seed": 2}).json()
        assert re.fullmatch(r"id-[0-9]{3}[!?]", body["choices"][0]["text"]), body


def test_streamed_constrained_output_equals_the_unstreamed_one(http: httpx.Client) -> None:
    body = {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": Person.model_json_schema()}}, "max_tokens": 200, "seed": 9}
    whole = http.post(H, json=body).json()["choices"][0]["message"]["content"]
    pieces = []
    with http.stream("POST", H, json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == whole


ZEBRA_APPLE = {"type": "object", "properties": {"zebra": {"type": "boolean"}, "apple": {"type": "boolean"}},
               "required": ["zebra", "apple"]}
REASONING_ANSWER = {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
                    "required": ["reasoning", "answer"], "additionalProperties": False}


@pytest.mark.parametrize(("path", "fields", "keys"), [
    (C, {"prompt": "JSON:", "structured_outputs": {"json": ZEBRA_APPLE}}, ["zebra", "apple"]),
    (H, {"messages": USER, "structured_outputs": {"json": ZEBRA_APPLE}}, ["zebra", "apple"]),
    (H, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "strict": True, "schema": REASONING_ANSWER}}}, ["reasoning", "answer"]),
])
def test_json_schema_keys_come_in_the_schema_order(http: httpx.Client, path: str, fields: dict[str, Any],
                                                  keys: list[str]) -> None:
    for seed in range(2):
        body = http.post(path, json={**fields, "max_tokens": 100, "seed": seed}).json()
        choice = body["choices"][0]
        text = choice["text"] if path == C else choice["message"]["content"]
        assert list(json.loads(text)) == keys, text


def test_the_grammar_wins_over_min_tokens_and_ignore_eos(http: httpx.Client) -> None:
    body = {"messages": USER, "response_format": {"type": "json_object"}, "max_tokens": 120, "min_tokens": 60,
            "ignore_eos": True, "seed": 4}
    response = http.post(H, json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)


def test_unconstrained_seeded_request_is_unchanged_by_constrained_neighbours(server: Any) -> None:
    plain = {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True, "temperature": 1.0, "seed": 123}
    constrained = {"prompt": "x", "max_tokens": 24, "seed": 7, "structured_outputs": {"regex": "[a-z ]{5,40}"}}

    async def run(with_neighbours: bool) -> str:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            calls = [client.post(C, json=plain)]
            if with_neighbours:
                calls += [client.post(C, json={**constrained, "seed": s}) for s in range(3)]
            responses = await asyncio.gather(*calls)
        for r in responses:
            assert r.status_code == 200, r.text
        return responses[0].json()["choices"][0]["text"]

    alone = asyncio.run(run(False))
    assert asyncio.run(run(True)) == alone


BAD_CONSTRAINTS: list[tuple[str, dict[str, Any], str]] = [
    (H, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    (H, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, "response_format.json_schema.schema"),
    (H, {"structured_outputs": {"regex": "(((("}}, "structured_outputs.regex"),
    (C, {"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    (C, {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    (C, {"structured_outputs": {"json": {"type": "string", "minLength": 5, "maxLength": 2}}},
     "structured_outputs.json"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD_CONSTRAINTS)
def test_bad_constraint_is_400_naming_the_field(http: httpx.Client, path: str, fields: dict[str, Any],
                                                param: str) -> None:
    base: dict[str, Any] = {"prompt": "x"} if path == C else {"messages": USER}
    error = assert_error(http.post(path, json={**base, **fields}), 400, param)
    assert param in error["message"], error
    # Asked again: answered from the cache, the same way.
    assert assert_error(http.post(path, json={**base, **fields}), 400, param) == error
    still_serving(http)
