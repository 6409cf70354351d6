"""POST /v1/completions over real HTTP: the openai client, streaming vs not, usage, logprobs, n, echo,
token-id prompts, seeds, stop strings and stop token ids, min_tokens, UTF-8 safety while streaming."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion

from server.tokenizer import Tokenizer
from tests.server.sse import completion_text, finish_of, stream_chunks

PROMPT = "The history of the printing press"
FFFD = "\ufffd"


def complete(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(http: httpx.Client, prompt: Any = PROMPT, max_tokens: int = 16, **body: Any) -> dict[str, Any]:
    return complete(http, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, **body)


def single_token_id(tok: Tokenizer, text: str) -> int | None:
    ids = tok.encode(text)
    return ids[0] if len(ids) == 1 and tok.decode(ids) == text else None


# --- the official client ---------------------------------------------------------------------------


def test_openai_client_completion(oai: openai.OpenAI, tok: Tokenizer) -> None:
    resp = oai.completions.create(model="customllm", prompt=PROMPT, max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert isinstance(resp, Completion)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == "customllm"
    assert resp.created > 0
    [choice] = resp.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert isinstance(choice.text, str) and choice.text
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert resp.usage.completion_tokens == 9
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 9


def test_openai_client_stream_with_usage_counts_streamed_tokens(oai: openai.OpenAI, http: httpx.Client) -> None:
    expected = greedy(http, max_tokens=12)["choices"][0]["text"]
    stream = oai.completions.create(model="customllm", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                    logprobs=0, stream_options={"include_usage": True},
                                    extra_body={"ignore_eos": True})
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert all(c.object == "text_completion" and c.id == last.id for c in chunks)
    streamed_tokens = sum(len(c.choices[0].logprobs.tokens) for c in body if c.choices[0].logprobs)
    assert last.usage.completion_tokens == streamed_tokens == 12
    assert "".join(c.choices[0].text for c in body) == expected
    assert [c.choices[0].finish_reason for c in body].count("length") == 1
    assert body[-1].choices[0].finish_reason == "length"


def test_continuous_usage_stats_on_every_chunk(http: httpx.Client, tok: Tokenizer) -> None:
    chunks = stream_chunks(http, "/v1/completions", dict(
        prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True, logprobs=0,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    num_prompt = len(tok.encode(PROMPT))
    streamed = 0
    for chunk in chunks[:-1]:
        streamed += len(chunk["choices"][0]["logprobs"]["tokens"])
        assert chunk["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": streamed,
                                  "total_tokens": num_prompt + streamed}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == streamed == 10


# --- streaming equals non-streaming ------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [PROMPT, "Grüße aus Köln — 東京 😀", "x"])
def test_stream_equals_non_stream_greedy(http: httpx.Client, prompt: str) -> None:
    whole = greedy(http, prompt, max_tokens=40)
    chunks = stream_chunks(http, "/v1/completions", dict(prompt=prompt, max_tokens=40, temperature=0,
                                                         ignore_eos=True, stream_options={"include_usage": True}))
    assert whole["usage"]["completion_tokens"] == 40
    assert completion_text(chunks) == whole["choices"][0]["text"]
    assert finish_of(chunks) == ("length", None)
    assert chunks[-1]["usage"] == whole["usage"]
    assert all(c["object"] == "text_completion" and c["model"] == "customllm" for c in chunks)


def test_stream_logprobs_equal_non_stream_logprobs(http: httpx.Client) -> None:
    whole = greedy(http, max_tokens=12, logprobs=2)["choices"][0]["logprobs"]
    chunks = stream_chunks(http, "/v1/completions", dict(prompt=PROMPT, max_tokens=12, temperature=0,
                                                         ignore_eos=True, logprobs=2))
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    for key in ("tokens", "text_offset", "top_logprobs"):
        assert [x for p in parts for x in p[key]] == whole[key], key
    assert [x for p in parts for x in p["token_logprobs"]] == pytest.approx(whole["token_logprobs"])


def test_logprobs_fields(http: httpx.Client) -> None:
    resp = greedy(http, max_tokens=10, logprobs=3)
    choice = resp["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 10
    offset = 0
    for token, logprob, top, text_offset in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                                lp["text_offset"], strict=True):
        assert text_offset == offset
        offset += len(token)
        assert logprob <= 0
        assert 1 <= len(top) <= 3  # two candidates may share a display string
        # Greedy takes the most likely token, so its logprob is the best of the top ones.
        assert logprob == pytest.approx(max(top.values()))
        if FFFD not in token:
            assert top[token] == pytest.approx(logprob)
    if FFFD not in choice["text"]:
        assert "".join(lp["tokens"]) == choice["text"]


# --- n, list prompts, token ids, echo, seeds -------------------------------------------------------------


def test_n_2_sampled_streaming_matches_non_streaming(http: httpx.Client) -> None:
    body = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2, ignore_eos=True)
    whole = complete(http, **body)
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    texts = [c["text"] for c in whole["choices"]]
    assert texts[0] != texts[1]  # the two samples get different seeds
    assert whole["usage"]["completion_tokens"] == 16
    chunks = stream_chunks(http, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    assert [completion_text(chunks, i) for i in (0, 1)] == texts
    assert finish_of(chunks, 0)[0] == finish_of(chunks, 1)[0] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 16


def test_list_of_prompts_with_n(http: httpx.Client) -> None:
    prompts = ["Once upon a time", "In a galaxy far away"]
    alone = [greedy(http, p, max_tokens=6)["choices"][0]["text"] for p in prompts]
    resp = greedy(http, prompts, max_tokens=6, n=2)
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in resp["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    assert resp["usage"]["completion_tokens"] == 24


def test_token_id_prompts_equal_text_prompts(http: httpx.Client, tok: Tokenizer) -> None:
    ids = tok.encode(PROMPT)
    by_text = greedy(http, PROMPT, max_tokens=8)
    by_ids = greedy(http, ids, max_tokens=8)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["usage"] == by_text["usage"]
    other = tok.encode("A second prompt")
    both = greedy(http, [ids, other], max_tokens=8)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert both["choices"][1]["text"] == greedy(http, other, max_tokens=8)["choices"][0]["text"]
    assert both["usage"]["prompt_tokens"] == len(ids) + len(other)


def test_echo(http: httpx.Client, tok: Tokenizer) -> None:
    prompt = "Échos: naïve café 😀"
    scored = complete(http, prompt=prompt, max_tokens=0, echo=True)
    assert scored["choices"][0]["text"] == prompt
    assert scored["usage"] == {"prompt_tokens": len(tok.encode(prompt)), "completion_tokens": 0,
                               "total_tokens": len(tok.encode(prompt))}
    plain = greedy(http, prompt, max_tokens=6)["choices"][0]["text"]
    echoed = greedy(http, prompt, max_tokens=6, echo=True)["choices"][0]["text"]
    assert echoed == prompt + plain
    chunks = stream_chunks(http, "/v1/completions", dict(prompt=prompt, max_tokens=6, temperature=0,
                                                         ignore_eos=True, echo=True))
    assert chunks[0]["choices"][0]["text"] == prompt
    assert completion_text(chunks) == prompt + plain
    ids = tok.encode(prompt)
    assert greedy(http, ids, max_tokens=6, echo=True)["choices"][0]["text"] == prompt + plain


def test_same_seed_same_text(http: httpx.Client) -> None:
    body = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, ignore_eos=True)
    first = complete(http, seed=1234, **body)["choices"][0]["text"]
    assert complete(http, seed=1234, **body)["choices"][0]["text"] == first
    assert complete(http, seed=1235, **body)["choices"][0]["text"] != first
    chunks = stream_chunks(http, "/v1/completions", body | {"seed": 1234})
    assert completion_text(chunks) == first


# --- stop strings, stop token ids, min_tokens ----------------------------------------------------------------


def _boundary_stop(lp: dict[str, Any], text: str, span: int) -> tuple[str, int, int]:
    """A stop string made of the end of token i, `span - 2` whole tokens and the start of token i+span-1.

    Returns (stop, where it starts in text, the number of tokens up to the one that completes it).
    """
    tokens, offsets = lp["tokens"], lp["text_offset"]
    for i in range(1, len(tokens) - span):
        window = tokens[i:i + span]
        if any(len(t.strip()) < 2 or FFFD in t for t in (window[0], window[-1])) or any(FFFD in t for t in window):
            continue
        stop = window[0][-2:] + "".join(window[1:-1]) + window[-1][:2]
        start = offsets[i] + len(window[0]) - 2
        if text.find(stop) == start:
            return stop, start, i + span
    raise AssertionError(f"no usable token boundary in {tokens}")


@pytest.mark.parametrize("span", [2, 3])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(http: httpx.Client, span: int, include: bool) -> None:
    reference = greedy(http, max_tokens=32, logprobs=0)["choices"][0]
    text = reference["text"]
    stop, start, num_tokens = _boundary_stop(reference["logprobs"], text, span)
    expected = text[:start + len(stop)] if include else text[:start]
    body = dict(prompt=PROMPT, max_tokens=32, temperature=0, ignore_eos=True,
                stop=["never-appears-here", stop], include_stop_str_in_output=include)
    whole = complete(http, **body)
    choice = whole["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (expected, "stop", stop)
    assert whole["usage"]["completion_tokens"] == num_tokens
    chunks = stream_chunks(http, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    assert completion_text(chunks) == expected
    assert finish_of(chunks) == ("stop", stop)
    assert chunks[-1]["usage"]["completion_tokens"] == num_tokens


def test_stop_string_as_plain_string(http: httpx.Client) -> None:
    reference = greedy(http, max_tokens=32, logprobs=0)["choices"][0]
    stop, start, _ = _boundary_stop(reference["logprobs"], reference["text"], 2)
    choice = greedy(http, max_tokens=32, stop=stop)["choices"][0]
    assert (choice["text"], choice["stop_reason"]) == (reference["text"][:start], stop)


def test_stop_token_ids(http: httpx.Client, tok: Tokenizer) -> None:
    reference = greedy(http, max_tokens=12, logprobs=0)["choices"][0]
    tokens = reference["logprobs"]["tokens"]
    ids = [single_token_id(tok, t) for t in tokens]
    k = next(k for k in range(2, len(ids)) if ids[k] is not None and ids[k] not in ids[:k])
    stop_id = ids[k]
    for include in (False, True):
        body = dict(prompt=PROMPT, max_tokens=12, temperature=0, stop_token_ids=[stop_id],
                    include_stop_str_in_output=include)
        expected = "".join(tokens[:k + 1] if include else tokens[:k])
        whole = complete(http, **body)
        choice = whole["choices"][0]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (expected, "stop", stop_id)
        assert whole["usage"]["completion_tokens"] == k + 1
        chunks = stream_chunks(http, "/v1/completions", body)
        assert completion_text(chunks) == expected
        assert finish_of(chunks) == ("stop", stop_id)


def test_min_tokens_holds_back_stop_tokens(http: httpx.Client, tok: Tokenizer) -> None:
    forced = single_token_id(tok, " banana")
    assert forced is not None
    body = dict(prompt=PROMPT, max_tokens=20, temperature=0, logit_bias={str(forced): 100},
                stop_token_ids=[forced])
    first = complete(http, **body)
    assert first["usage"]["completion_tokens"] == 1
    assert (first["choices"][0]["finish_reason"], first["choices"][0]["stop_reason"]) == ("stop", forced)
    held = complete(http, **body, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6  # 5 tokens while the stop token is masked, then the stop token
    assert (held["choices"][0]["finish_reason"], held["choices"][0]["stop_reason"]) == ("stop", forced)
    assert " banana" not in held["choices"][0]["text"]


# --- UTF-8 safety -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("char", "prompt"), [(" 😀", "Emoji time:"), (" 😀", "Smile"), ("世", "中文")])
def test_streaming_never_splits_a_character(http: httpx.Client, tok: Tokenizer, char: str, prompt: str) -> None:
    """Only byte-level tokens that are pieces of `char` are allowed, so the model emits partial characters."""
    pieces = tok.encode(char)
    assert len(pieces) >= 2 and all(FFFD in tok.decode([p]) for p in pieces), "char must span partial tokens"
    body = dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True,
                logit_bias={str(p): 100 for p in pieces})
    whole = complete(http, **body)["choices"][0]["text"]
    complete_char = char.strip()
    assert complete_char in whole, f"the model never completed {char!r}: {whole!r}"
    chunks = stream_chunks(http, "/v1/completions", body)
    deltas = [c["choices"][0]["text"] for c in chunks]
    assert "".join(deltas) == whole
    # A delta may hold U+FFFD only for bytes that never form a character; each one is final text.
    assert sum(d.count(FFFD) for d in deltas) == whole.count(FFFD)
    assert any(complete_char in d for d in deltas)  # some delta carries the whole character, not its pieces
