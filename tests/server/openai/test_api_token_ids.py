"""vLLM's token-id extras on completions and chat, whole and streamed: return_tokens_as_token_ids (logprobs name
tokens 'token_id:N', the sampled one and the alternatives) and return_token_ids (prompt_token_ids and per-choice
token_ids, streamed as per-chunk deltas), which RL frameworks and evaluation harnesses use to get exact ids back."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from server.tokenizer import Tokenizer
from tests.server.sse import assert_error, stream_chunks

PROMPT = "The sea was calm that morning"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
BASE = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
ID = re.compile(r"token_id:(\d+)")


def ids_of(labels: list[str]) -> list[int]:
    """The ids 'token_id:N' labels spell (failing on any other label)."""
    matches = [ID.fullmatch(label) for label in labels]
    assert all(matches), labels
    return [int(m.group(1)) for m in matches if m]


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def completion_logprobs(choices: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The legacy logprobs lists of one choice's chunks (or of a whole choice), concatenated."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    for c in choices:
        for key in out:
            out[key] += c["logprobs"][key]
    return out


@pytest.mark.parametrize("echo", [False, True])
def test_completions_logprobs_name_tokens_by_id(http: httpx.Client, tok: Tokenizer, echo: bool) -> None:
    body = BASE | {"prompt": PROMPT, "logprobs": 2, "echo": echo}
    plain = post(http, "/v1/completions", body)["choices"][0]["logprobs"]
    as_ids = body | {"return_tokens_as_token_ids": True, "return_token_ids": True}
    whole = post(http, "/v1/completions", as_ids)["choices"][0]
    chunks = stream_chunks(http, "/v1/completions", as_ids)
    streamed = completion_logprobs([c for chunk in chunks for c in chunk["choices"] if c["logprobs"]])
    for lp in (whole["logprobs"], streamed):
        ids = ids_of(lp["tokens"])
        prompt = tok.encode(PROMPT) if echo else []
        assert ids == prompt + whole["token_ids"] and [tok.token_text(t) for t in ids] == plain["tokens"]
        assert lp["token_logprobs"] == plain["token_logprobs"]
        for top, plain_top in zip(lp["top_logprobs"], plain["top_logprobs"], strict=True):
            if plain_top is None:  # the echoed prompt's first token
                assert top is None
                continue
            assert {tok.token_text(t): v for t, v in zip(ids_of(list(top)), top.values(), strict=True)} == plain_top


def test_completions_return_token_ids(http: httpx.Client, tok: Tokenizer) -> None:
    body = BASE | {"prompt": PROMPT, "n": 2, "seed": 1, "temperature": 1.0, "return_token_ids": True}
    whole = post(http, "/v1/completions", body)
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == tok.encode(PROMPT)
        assert len(choice["token_ids"]) == 8 and tok.decode(choice["token_ids"]) == choice["text"]
    assert whole["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in whole["choices"])
    chunks = stream_chunks(http, "/v1/completions", body)
    for choice in whole["choices"]:
        mine = [c for chunk in chunks for c in chunk["choices"] if c["index"] == choice["index"]]
        assert [c["prompt_token_ids"] for c in mine if c["prompt_token_ids"] is not None] == [tok.encode(PROMPT)]
        assert [t for c in mine for t in c["token_ids"] or ()] == choice["token_ids"]
    plain = post(http, "/v1/completions", body | {"return_token_ids": False})["choices"][0]
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None


def test_completions_token_ids_stop_where_the_text_stops(http: httpx.Client, tok: Tokenizer) -> None:
    text = post(http, "/v1/completions", BASE | {"prompt": PROMPT})["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    choice = post(http, "/v1/completions", BASE | {"prompt": PROMPT, "stop": stop, "return_token_ids": True})
    ids = choice["choices"][0]["token_ids"]
    assert len(ids) == choice["usage"]["completion_tokens"] < 8 and stop in tok.decode(ids)


def test_completions_echo_only_returns_the_prompt_ids(http: httpx.Client, tok: Tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "return_token_ids": True}
    choice = post(http, "/v1/completions", body)["choices"][0]
    assert choice["prompt_token_ids"] == tok.encode(PROMPT) and choice["token_ids"] == []


def test_chat_logprobs_name_tokens_by_id(http: httpx.Client, tok: Tokenizer) -> None:
    body = BASE | {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2}
    plain = post(http, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    as_ids = body | {"return_tokens_as_token_ids": True, "return_token_ids": True}
    whole = post(http, "/v1/chat/completions", as_ids)["choices"][0]
    chunks = stream_chunks(http, "/v1/chat/completions", as_ids)
    streamed = [e for chunk in chunks for c in chunk["choices"] if c["logprobs"] for e in c["logprobs"]["content"]]
    for content in (whole["logprobs"]["content"], streamed):
        ids = ids_of([e["token"] for e in content])
        assert ids == whole["token_ids"] and [tok.token_text(t) for t in ids] == [e["token"] for e in plain]
        for entry, plain_entry in zip(content, plain, strict=True):
            assert entry["logprob"] == plain_entry["logprob"] and entry["bytes"] == plain_entry["bytes"]
            top = ids_of([t["token"] for t in entry["top_logprobs"]])
            assert [tok.token_text(t) for t in top] == [t["token"] for t in plain_entry["top_logprobs"]]
            assert [t["bytes"] for t in entry["top_logprobs"]] == [t["bytes"] for t in plain_entry["top_logprobs"]]


def test_chat_return_token_ids(http: httpx.Client, tok: Tokenizer) -> None:
    body = BASE | {"messages": MESSAGES, "return_token_ids": True}
    whole = post(http, "/v1/chat/completions", body)
    assert whole["prompt_token_ids"] == tok.encode_chat(MESSAGES)
    [choice] = whole["choices"]
    assert len(choice["token_ids"]) == 8 and tok.decode(choice["token_ids"]) == choice["message"]["content"]
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert [c["prompt_token_ids"] for c in chunks if c["prompt_token_ids"] is not None] == [whole["prompt_token_ids"]]
    assert chunks[0]["prompt_token_ids"] is not None
    assert [t for chunk in chunks for c in chunk["choices"] for t in c["token_ids"] or ()] == choice["token_ids"]
    plain = post(http, "/v1/chat/completions", body | {"return_token_ids": False})
    assert plain["prompt_token_ids"] is None and plain["choices"][0]["token_ids"] is None


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", ["return_tokens_as_token_ids", "return_token_ids"])
def test_the_fields_take_booleans_only(http: httpx.Client, path: str, field: str) -> None:
    body = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    assert_error(http.post(path, json=body | {field: "yes"}), 400, field)
