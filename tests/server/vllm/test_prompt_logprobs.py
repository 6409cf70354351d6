"""Prompt logprobs over real HTTP (issue 18): OpenAI's echo + logprobs and vLLM's prompt_logprobs, checked against
a reference built from ordinary requests (each prompt prefix, the next prompt token forced by logit_bias: reported
logprobs are the raw model's), and bypassing the prefix cache for the scored tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.tokenizer import Tokenizer
from tests.server.live import LiveServer
from tests.server.sse import stream_chunks

PROMPT = list(range(2000, 2040))  # 40 token ids: two full cache blocks of 16
K = 2


def complete(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def reference(http: httpx.Client) -> list[tuple[float, dict[str, float]]]:
    """(logprob of PROMPT[i] given PROMPT[:i], the top-K dict at that position) for i >= 1."""
    out = []
    for i in range(1, len(PROMPT)):
        choice = complete(http, prompt=PROMPT[:i], max_tokens=1, temperature=0, logprobs=K,
                          logit_bias={str(PROMPT[i]): 100})["choices"][0]
        lp = choice["logprobs"]
        out.append((lp["token_logprobs"][0], lp["top_logprobs"][0]))
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) < 1e-4  # the same logits from differently shaped batches


def test_echo_logprobs_score_the_prompt(server: LiveServer, http: httpx.Client, tok: Tokenizer,
                                        reference: list[tuple[float, dict[str, float]]]) -> None:
    complete(http, prompt=PROMPT, max_tokens=1)  # its blocks are now in the prefix cache
    hits = server.metric("customllm_prefix_cache_hits_total")
    choice = complete(http, prompt=PROMPT, max_tokens=0, echo=True, logprobs=K)["choices"][0]
    assert server.metric("customllm_prefix_cache_hits_total") == hits  # scored tokens are computed, not read
    text = tok.decode(PROMPT, skip_special_tokens=False)
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [tok.token_text(t) for t in PROMPT]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len(tok.decode(PROMPT[:i], skip_special_tokens=False)) for i in range(len(PROMPT))]
    for i, (want, want_top) in enumerate(reference, start=1):
        assert _close(lp["token_logprobs"][i], want), (i, lp["token_logprobs"][i], want)
        top = lp["top_logprobs"][i]
        assert top.keys() == want_top.keys(), (i, top, want_top)  # the K best and the prompt token itself
        assert all(_close(top[t], want_top[t]) for t in top)


def test_echo_logprobs_with_generation_streamed_or_not(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 1, "ignore_eos": True,
            "n": 2}
    whole = complete(http, **body)
    for choice in whole["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(PROMPT) + 5 and lp["token_logprobs"][0] is None
        assert all(v is not None for v in lp["token_logprobs"][1:])
        assert lp["text_offset"][len(PROMPT)] == len(whole["choices"][0]["text"]) - len(
            "".join(lp["tokens"][len(PROMPT):]))
    chunks = stream_chunks(http, "/v1/completions", body)
    for index in (0, 1):
        parts = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]
        assert "".join(p["text"] for p in parts) == whole["choices"][index]["text"]
        merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in parts:
            for key in merged:
                merged[key] += (p["logprobs"] or {}).get(key, [])
        assert merged.keys() == whole["choices"][index]["logprobs"].keys()
        for key in ("tokens", "text_offset"):
            assert merged[key] == whole["choices"][index]["logprobs"][key]
        for a, b in zip(merged["token_logprobs"][1:], whole["choices"][index]["logprobs"]["token_logprobs"][1:],
                        strict=True):
            assert _close(a, b)


def test_vllm_prompt_logprobs(http: httpx.Client, tok: Tokenizer,
                              reference: list[tuple[float, dict[str, float]]]) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "prompt_logprobs": K}
    choice = complete(http, **body)["choices"][0]
    entries = choice["prompt_logprobs"]
    assert choice["text"] and choice["logprobs"] is None
    assert len(entries) == len(PROMPT) and entries[0] is None
    for i, (entry, (want, want_top)) in enumerate(zip(entries[1:], reference, strict=True), start=1):
        own = entry[str(PROMPT[i])]
        assert _close(own["logprob"], want) and own["decoded_token"] == tok.token_text(PROMPT[i])
        best = sorted(entry.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in best[:K]] == list(range(1, K + 1))
        assert {e["decoded_token"] for e in best[:K]} | {own["decoded_token"]} == set(want_top)
        assert own["rank"] >= 1 and (own["rank"] <= K) == (len(entry) == K)
    streamed = stream_chunks(http, "/v1/completions", body)
    firsts = [c for chunk in streamed for c in chunk["choices"] if c["prompt_logprobs"] is not None]
    assert len(firsts) == 1 and firsts[0]["prompt_logprobs"][0] is None
    for got, want_entry in zip(firsts[0]["prompt_logprobs"][1:], entries[1:], strict=True):
        assert got.keys() == want_entry.keys()
        assert all(_close(got[t]["logprob"], want_entry[t]["logprob"]) for t in got)
