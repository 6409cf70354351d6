"""POST /v1/chat/completions over real HTTP: the openai client, streaming vs not, usage, logprobs, n, stop strings,
the ChatML end token, UTF-8 safety."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.tokenizer import Tokenizer
from tests.server.sse import chat_text, finish_of, stream_chunks

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about printing."}]
FFFD = "\ufffd"


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/chat/completions", json={"messages": MESSAGES} | body)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(http: httpx.Client, max_tokens: int = 16, **body: Any) -> dict[str, Any]:
    return chat(http, max_tokens=max_tokens, temperature=0, **body)


def test_openai_client_chat(oai: openai.OpenAI, tok: Tokenizer) -> None:
    resp = oai.chat.completions.create(model="customllm", messages=MESSAGES, max_tokens=10, temperature=0)
    assert isinstance(resp, ChatCompletion)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == "customllm"
    [choice] = resp.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(tok.encode_chat(MESSAGES))
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 10


def test_openai_client_chat_stream_with_usage(oai: openai.OpenAI, http: httpx.Client) -> None:
    expected = greedy(http, max_tokens=12)["choices"][0]["message"]["content"]
    stream = oai.chat.completions.create(model="customllm", messages=MESSAGES, max_tokens=12, temperature=0,
                                         stream=True, logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    first, *body, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in [first, *body])
    streamed_tokens = sum(len(c.choices[0].logprobs.content) for c in body if c.choices[0].logprobs)
    assert last.usage.completion_tokens == streamed_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]


def test_continuous_usage_stats(http: httpx.Client, tok: Tokenizer) -> None:
    chunks = stream_chunks(http, "/v1/chat/completions", dict(
        messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    num_prompt = len(tok.encode_chat(MESSAGES))
    streamed = 0
    for chunk in chunks[:-1]:
        lp = chunk["choices"][0]["logprobs"]
        streamed += len(lp["content"]) if lp else 0
        assert chunk["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": streamed,
                                  "total_tokens": num_prompt + streamed}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == streamed == 8


def test_stream_equals_non_stream_greedy(http: httpx.Client) -> None:
    whole = greedy(http, max_tokens=40)
    chunks = stream_chunks(http, "/v1/chat/completions", dict(messages=MESSAGES, max_tokens=40, temperature=0))
    assert whole["usage"]["completion_tokens"] == 40
    assert chat_text(chunks) == whole["choices"][0]["message"]["content"]
    assert finish_of(chunks) == ("length", None)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_max_completion_tokens_wins_over_max_tokens(http: httpx.Client) -> None:
    resp = chat(http, max_tokens=3, max_completion_tokens=5, temperature=0)
    assert resp["usage"]["completion_tokens"] == 5


def test_text_parts_equal_a_string(http: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "more."}]}]
    joined = [{"role": "user", "content": "Tell me\nmore."}]
    a = chat(http, messages=parts, max_tokens=6, temperature=0)
    b = chat(http, messages=joined, max_tokens=6, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_n_2_seeded(http: httpx.Client) -> None:
    body = dict(messages=MESSAGES, max_tokens=8, temperature=1.0, seed=11, n=2)
    whole = chat(http, **body)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert texts[0] != texts[1]
    assert chat(http, **body)["choices"][0]["message"]["content"] == texts[0]  # same seed, same text
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert [chat_text(chunks, i) for i in (0, 1)] == texts
    roles = [c["delta"].get("role") for chunk in chunks for c in chunk["choices"] if "role" in c["delta"]]
    assert roles == ["assistant", "assistant"]  # one role chunk per choice


def test_logprobs_content(http: httpx.Client, tok: Tokenizer) -> None:
    resp = greedy(http, max_tokens=10, logprobs=True, top_logprobs=2)
    choice = resp["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 10
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy = the best one
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    raw = b"".join(bytes(e["bytes"]) for e in content)
    assert raw.decode("utf-8", errors="replace") == choice["message"]["content"]
    no_top = greedy(http, max_tokens=3, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in no_top] == [[], [], []]


def test_stop_string_across_tokens_both_modes(http: httpx.Client) -> None:
    reference = greedy(http, max_tokens=24, logprobs=True)["choices"][0]
    text = reference["message"]["content"]
    tokens = [e["token"] for e in reference["logprobs"]["content"]]
    offset = 0
    for i, (a, b) in enumerate(itertools.pairwise(tokens)):
        stop = a[-2:] + b[:2]
        if i > 0 and len(a.strip()) >= 2 and len(b.strip()) >= 2 and FFFD not in a + b \
                and text.find(stop) == offset + len(a) - 2:
            break
        offset += len(a)
    else:
        raise AssertionError(f"no usable boundary in {tokens}")
    body = dict(messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop])
    whole = chat(http, **body)["choices"][0]
    assert (whole["message"]["content"], whole["finish_reason"], whole["stop_reason"]) == (text[:text.find(stop)],
                                                                                         "stop", stop)
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert chat_text(chunks) == text[:text.find(stop)]
    assert finish_of(chunks) == ("stop", stop)
    included = chat(http, **body, include_stop_str_in_output=True)["choices"][0]["message"]["content"]
    assert included == text[:text.find(stop) + len(stop)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_chatml_end_token_stops_without_text(http: httpx.Client, tok: Tokenizer, skip_special_tokens: bool) -> None:
    [im_end] = tok.chat_stop_token_ids
    resp = greedy(http, max_tokens=10, logit_bias={str(im_end): 100}, skip_special_tokens=skip_special_tokens)
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    assert resp["usage"]["completion_tokens"] == 1


def test_streaming_never_splits_an_emoji(http: httpx.Client, tok: Tokenizer) -> None:
    pieces = tok.encode(" 😀")
    body = dict(messages=[{"role": "user", "content": "Emoji, bitte: 😀 ✓ ñ"}], max_tokens=24, temperature=0,
                logprobs=True, logit_bias={str(p): 100 for p in pieces})
    whole = chat(http, **body)["choices"][0]
    text = whole["message"]["content"]
    assert "😀" in text
    raw = b"".join(bytes(e["bytes"]) for e in whole["logprobs"]["content"])
    assert raw.decode("utf-8", errors="replace") == text  # the text is exactly the decoded bytes
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    deltas = [c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"]]
    assert "".join(deltas) == text
    assert sum(d.count(FFFD) for d in deltas) == text.count(FFFD)
