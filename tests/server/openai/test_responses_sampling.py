"""/v1/responses takes vLLM's sampling extras and honours them as chat does, whole and streamed: ignore_eos (what
`vllm bench serve --backend openai-responses` always sends), top_k, min_p, repetition_penalty, stop,
stop_token_ids, skip_special_tokens and include_stop_str_in_output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.tokenizer import Tokenizer
from tests.server.live import live_server
from tests.server.openai.biased import write_biased_checkpoint
from tests.server.openai.responses_helpers import R, respond, stable, stream_events
from tests.server.sse import assert_error

PROMPT = "Tell me a story about the sea."
GREEDY = {"input": PROMPT, "max_output_tokens": 24, "temperature": 0, "ignore_eos": True}


def text_of(response: dict[str, Any]) -> str:
    return "".join(c["text"] for item in response["output"] for c in item["content"])


def whole_and_streamed(http: httpx.Client, **body: Any) -> dict[str, Any]:
    """The response, after checking that the stream ends in the same response and its deltas spell its text."""
    whole = respond(http, **body)
    events = stream_events(http, **body)
    final = events[-1][1]["response"]
    assert stable(final) == stable(whole)
    assert "".join(data["delta"] for name, data in events if name == "response.output_text.delta") == text_of(whole)
    return whole


def chat_text(http: httpx.Client, body: dict[str, Any]) -> str:
    """The chat answer to the same conversation with the same fields."""
    chat = {k: v for k, v in body.items() if k not in ("input", "max_output_tokens")}
    chat |= {"messages": [{"role": "user", "content": body["input"]}], "max_tokens": body["max_output_tokens"]}
    response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def greedy(http: httpx.Client) -> str:
    text = text_of(respond(http, **GREEDY))
    assert len(text) > 20
    return text


@pytest.mark.parametrize("fields", [{"top_k": 1}, {"min_p": 1.0}], ids=["top_k", "min_p"])
def test_top_k_1_and_min_p_1_sample_the_greedy_text(http: httpx.Client, greedy: str, fields: dict[str, Any]) -> None:
    body = GREEDY | {"temperature": 1.0, "seed": 3} | fields
    assert text_of(whole_and_streamed(http, **body)) == greedy == chat_text(http, body)
    # Without the field the same seed samples something else.
    assert text_of(respond(http, **GREEDY | {"temperature": 1.0, "seed": 3})) != greedy


def test_repetition_penalty_changes_the_greedy_text_as_in_chat(http: httpx.Client, greedy: str) -> None:
    body = GREEDY | {"repetition_penalty": 0.2}  # below 1: tokens already seen are favoured
    text = text_of(whole_and_streamed(http, **body))
    assert text != greedy and text == chat_text(http, body)


@pytest.mark.parametrize("keep", [False, True])
def test_stop_cuts_the_text(http: httpx.Client, greedy: str, keep: bool) -> None:
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    cut = greedy.index(stop) + (len(stop) if keep else 0)
    body = GREEDY | {"stop": [stop, "never in it"], "include_stop_str_in_output": keep}
    response = whole_and_streamed(http, **body)
    assert text_of(response) == greedy[:cut] == chat_text(http, body)
    assert response["status"] == "completed" and response["usage"]["output_tokens"] < 24


def test_stop_token_ids_end_the_response(http: httpx.Client, tok: Tokenizer, greedy: str) -> None:
    ids = tok.encode(greedy)
    at = next(i for i in range(len(ids) // 2, len(ids)) if ids[i] not in ids[:i])  # its first occurrence
    response = whole_and_streamed(http, **GREEDY | {"stop_token_ids": [ids[at]]})
    assert response["status"] == "completed" and text_of(response) == tok.decode(ids[:at])


BAD = [({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
       ({"stop": [""]}, "stop"), ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
       ({"stop_token_ids": [10**6]}, "stop_token_ids"), ({"ignore_eos": "yes"}, "ignore_eos"),
       ({"skip_special_tokens": 1}, "skip_special_tokens")]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_values_are_400_naming_the_field(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    assert_error(http.post(R, json={"input": "Hi", "max_output_tokens": 2} | fields), 400, param)


# --- on a model whose greedy pick is always EOS: ignore_eos and skip_special_tokens ------------------------------


@pytest.fixture(scope="module")
def eos_http(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Iterator[httpx.Client]:
    checkpoint = write_biased_checkpoint(Path(tmp_path_factory.mktemp("eos-biased")), [tok.eos_token_id], 50.0)
    with live_server(checkpoint) as live, live.client() as client:
        yield client


def test_vllm_bench_serve_body_gets_exactly_max_output_tokens(eos_http: httpx.Client) -> None:
    # vllm bench serve --backend openai-responses --dataset-name random: this body, streamed, always ignore_eos.
    body = {"model": "customllm", "input": PROMPT, "max_output_tokens": 16, "store": False, "temperature": 0}
    assert respond(eos_http, **body)["usage"]["output_tokens"] == 1  # the control: EOS ends it
    response = whole_and_streamed(eos_http, **body | {"ignore_eos": True})
    assert response["usage"]["output_tokens"] == 16 and response["status"] == "incomplete"


def test_skip_special_tokens_false_keeps_them_in_the_text(eos_http: httpx.Client) -> None:
    body = {"input": PROMPT, "max_output_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert text_of(whole_and_streamed(eos_http, **body)) == ""  # greedy: EOS each time, skipped
    kept = whole_and_streamed(eos_http, **body | {"skip_special_tokens": False})
    assert text_of(kept) == "<|endoftext|>" * 4
