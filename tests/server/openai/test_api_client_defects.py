"""Regressions of issue 18 (answers a client relies on), over real HTTP: echo-only streams and limits, the sampled
token in `top_logprobs`, `text_offset` under stop strings, min_tokens holding back stop strings, 405 Allow / HEAD,
the developer role, the field named in context-limit errors; and issue 19.3 (the queue limit counts requests)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from server.openai.api import ServerSettings
from server.tokenizer import Tokenizer
from tests.server.live import engine_held_after, live_server
from tests.server.sse import DONE, assert_error, completion_text, iter_sse, stream_chunks

MAX_MODEL_LEN = 512  # the tiny checkpoint's
FFFD = "\ufffd"


def complete(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# --- echo only (max_tokens 0) -------------------------------------------------------------------------------


def test_echo_only_stream_is_sse(http: httpx.Client) -> None:
    body = {"prompt": ["Hello world", "Bye"], "max_tokens": 0, "echo": True, "n": 2,
            "stream_options": {"include_usage": True}}
    chunks = stream_chunks(http, "/v1/completions", body)
    choices = sorted((c for chunk in chunks for c in chunk["choices"]), key=lambda c: c["index"])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == [
        (0, "Hello world", "length"), (1, "Hello world", "length"), (2, "Bye", "length"), (3, "Bye", "length")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 0
    assert all(chunk["object"] == "text_completion" for chunk in chunks)


def test_echo_only_obeys_the_limits(http: httpx.Client, tok: Tokenizer) -> None:
    prompts = [f"prompt {i}" for i in range(17)]
    for max_tokens in (0, 1):
        response = http.post("/v1/completions", json={"prompt": prompts, "n": 16, "max_tokens": max_tokens,
                                                       "echo": True})
        assert "256 choices" in assert_error(response, 400, "n")["message"]
    long_prompt = list(range(1000, 1000 + MAX_MODEL_LEN + 89))  # 601 tokens
    for stream in (False, True):
        response = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 0, "echo": True,
                                                       "stream": stream})
        assert str(MAX_MODEL_LEN) in assert_error(response, 400)["message"]
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0, "echo": True,
                                                   "stop_token_ids": [999999]})
    assert_error(response, 400, "stop_token_ids")
    exact = list(range(1000, 1000 + MAX_MODEL_LEN))  # fills the context exactly: nothing is generated
    assert complete(http, prompt=exact, max_tokens=0, echo=True)["usage"]["prompt_tokens"] == MAX_MODEL_LEN


# --- logprobs ----------------------------------------------------------------------------------------------


def test_top_logprobs_always_hold_the_sampled_token(http: httpx.Client) -> None:
    for k in (0, 1, 3):
        body = {"prompt": "Hello world", "max_tokens": 40, "temperature": 2, "logprobs": k, "seed": 5,
                "ignore_eos": True}
        for lp in (complete(http, **body)["choices"][0]["logprobs"],
                   _streamed_logprobs(http, body)):
            assert len(lp["tokens"]) == 40
            for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
                if FFFD in token:
                    continue  # partial-character tokens share the display text U+FFFD
                assert top[token] == logprob, (token, top)
                if k == 0:
                    assert len(top) == 1
                else:
                    assert len(top) in (k, k + 1), top
                if len(top) == k + 1:  # the sampled token was not among the k best
                    assert all(v >= logprob for t, v in top.items() if t != token), top


def _streamed_logprobs(http: httpx.Client, body: dict[str, Any]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in stream_chunks(http, "/v1/completions", body):
        for choice in chunk["choices"]:
            for key in merged:
                merged[key] += (choice["logprobs"] or {}).get(key, [])
    return merged


def test_text_offset_ignores_stop_string_hold_back(http: httpx.Client) -> None:
    base = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "logprobs": 0, "ignore_eos": True}
    plain = complete(http, **base)["choices"][0]
    lp = plain["logprobs"]
    running = lp["text_offset"]
    if not any(FFFD in t for t in lp["tokens"]):  # display texts of partial characters have other lengths
        assert running == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    # Stop strings that never match but whose first characters do (every space, or a token's first letter).
    firsts = sorted({t.strip()[:1] for t in lp["tokens"] if t.strip()})
    for stop in (["uxx"], [" \x00never"], [f + "\x00" for f in firsts][:16]):
        held = complete(http, **base, stop=stop)["choices"][0]
        assert held["text"] == plain["text"]
        assert held["logprobs"]["text_offset"] == running, stop
        assert _streamed_logprobs(http, base | {"stop": stop})["text_offset"] == running, stop


def test_min_tokens_holds_back_stop_strings(http: httpx.Client) -> None:
    base = {"prompt": "Hello world", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    reference = complete(http, **base)["choices"][0]
    tokens = reference["logprobs"]["tokens"]
    first = next(t for t in tokens[:3] if t.strip() and FFFD not in t)  # a stop string an early token completes
    stop = first.strip()[:3]
    end_of = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    early = complete(http, **base, stop=[stop])
    assert early["choices"][0]["finish_reason"] == "stop" and early["usage"]["completion_tokens"] <= 3
    for min_tokens in (5, 10):
        body = base | {"stop": [stop], "min_tokens": min_tokens}
        held = complete(http, **body)
        count = held["usage"]["completion_tokens"]
        assert count >= min_tokens, held
        text = reference["text"]
        # The first match that ends in a token at or after min_tokens cuts the text; none ends earlier.
        cut = next((m for m in _matches(text, stop) if _token_of(end_of, m + len(stop)) + 1 >= min_tokens), None)
        assert held["choices"][0]["text"] == (text if cut is None else text[:cut])
        assert completion_text(stream_chunks(http, "/v1/completions", body)) == held["choices"][0]["text"]


def _matches(text: str, s: str) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(s, i)]


def _token_of(end_of: list[int], char_end: int) -> int:
    return next(i for i, end in enumerate(end_of) if end >= char_end)


# --- HTTP semantics ------------------------------------------------------------------------------------------


def test_405_names_the_allowed_methods_and_head_is_served(http: httpx.Client) -> None:
    response = http.get("/v1/completions")
    assert_error(response, 405)
    assert response.headers["Allow"] == "POST"
    assert set(http.delete("/health").headers["Allow"].split(", ")) == {"GET", "HEAD"}
    for path in ("/health", "/v1/models", "/version", "/metrics"):
        head = http.head(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers.get("content-type") == http.get(path).headers.get("content-type")


# --- chat -----------------------------------------------------------------------------------------------------


def test_developer_role_renders_as_system(http: httpx.Client) -> None:
    def tokens(role: str) -> list[int]:
        messages = [{"role": role, "content": "Be terse."}, {"role": "user", "content": "Hi"}]
        response = http.post("/tokenize", json={"messages": messages})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert tokens("developer") == tokens("system")
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    answers = [http.post("/v1/chat/completions", json=body | {"messages": [
        {"role": role, "content": "Be terse."}, {"role": "user", "content": "Hi"}]}) for role in ("developer",
                                                                                               "system")]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[0].json()["choices"][0]["message"] == answers[1].json()["choices"][0]["message"]


def test_context_limit_error_names_the_field_sent(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    for field in ("max_completion_tokens", "max_tokens"):
        response = http.post("/v1/chat/completions", json={"messages": messages, field: MAX_MODEL_LEN})
        error = assert_error(response, 400, field)
        assert field in error["message"]
        if field == "max_completion_tokens":
            assert "max_tokens is" not in error["message"]


# --- the queue limit counts requests (issue 19.3) ----------------------------------------------------------


def test_queue_limit_and_metric_count_requests_not_samples(tiny_checkpoint: Path) -> None:
    with live_server(tiny_checkpoint, ServerSettings(max_queued_requests=2), max_num_seqs=2) as server, \
            server.client() as http:
        wide = {"prompt": "wide", "n": 8, "max_tokens": 120, "ignore_eos": True, "stream": True}
        with engine_held_after(server, 1) as release, http.stream("POST", "/v1/completions", json=wide) as response:
            events = iter_sse(response)
            next(events)  # the n=8 request runs: 2 samples in the batch, 6 waiting for a slot
            assert server.metric("customllm_num_requests_waiting") == 0
            assert server.metric("customllm_num_requests_running") == 1
            release.set()
            results: list[httpx.Response] = []

            def fire() -> None:
                results.append(httpx.post(server.base_url + "/v1/completions", timeout=120,
                                          json={"prompt": "next", "max_tokens": 2}))

            threads = [threading.Thread(target=fire) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
            rest = list(events)
        assert rest[-1] == DONE
        finishes = [c["finish_reason"] for e in rest[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finishes == ["length"] * 8
