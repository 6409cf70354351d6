"""Issue 26.8/26.9/26.13 over real HTTP (float32): sampling fields at their extremes, and a seeded request's
output unchanged by the settings of the requests batched with it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.server.live import LiveServer

C, H = "/v1/completions", "/v1/chat/completions"


def post(http: httpx.Client, path: str, **body: Any) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_top_p_below_float32_keeps_the_top_token(http: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 5, "ignore_eos": True}
    greedy = post(http, C, **body, temperature=0)["choices"][0]
    assert greedy["text"]
    for top_p in (1e-46, 1e-300, 5e-324):
        choice = post(http, C, **body, temperature=1, top_p=top_p, seed=1)["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (greedy["text"], "length"), top_p
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy_chat = post(http, H, messages=messages, max_tokens=5, temperature=0)["choices"][0]["message"]
    chat = post(http, H, messages=messages, max_tokens=5, temperature=1, top_p=1e-300, seed=1)
    assert chat["choices"][0]["message"]["content"] == greedy_chat["content"]


@pytest.mark.parametrize("value", [0, -1e-300, -1])
def test_a_repetition_penalty_past_its_range_is_refused_naming_it(http: httpx.Client, value: float) -> None:
    for path, body in ((C, {"prompt": "x"}), (H, {"messages": [{"role": "user", "content": "x"}]})):
        response = http.post(path, json=body | {"repetition_penalty": value, "max_tokens": 2})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "repetition_penalty"


def test_the_ends_of_each_range_are_served(http: httpx.Client) -> None:
    base = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, "seed": 3}
    ends: list[dict[str, Any]] = [
        {"repetition_penalty": 0.01}, {"repetition_penalty": 100}, {"repetition_penalty": 1e-300},
        {"repetition_penalty": 1e300}, {"temperature": 2}, {"temperature": 1e-5},
        {"min_p": 1e-46}, {"min_p": 1}, {"top_k": -1}, {"top_k": 1}, {"presence_penalty": -2, "frequency_penalty": 2},
        {"logit_bias": {"42": 100, "43": -100}}, {"seed": -(2**63)}, {"seed": 2**64 - 1},
        {"min_tokens": 6},
    ]
    for extra in ends:
        choice = post(http, C, **base | extra)["choices"][0]
        assert choice["finish_reason"] == "length", extra
    # top_k past the vocabulary (and int64) keeps every token, as top_k 0 does.
    plain = post(http, C, **base, top_p=0.9)["choices"][0]["text"]
    assert post(http, C, **base, top_p=0.9, top_k=10**30)["choices"][0]["text"] == plain


def test_a_tiny_repetition_penalty_orders_tokens_as_its_exact_value(http: httpx.Client) -> None:
    """26.9: below 1e-20 every value orders the seen tokens the same way (each positive one far above the rest);
    from 1e-38 the penalised logits used to overflow to inf, and greedy picked among the infinities."""
    body = {"prompt": "one two three four five six seven eight nine ten " * 3, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    texts = {rp: post(http, C, **body, repetition_penalty=rp)["choices"][0]["text"]
             for rp in (1e-20, 1e-37, 1e-38, 1e-300, 5e-324)}
    assert len(set(texts.values())) == 1, texts


def test_seeded_top_k_top_p_request_is_unchanged_by_top_p_only_neighbours(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """26.13: beside rows with top_p alone, a top_k + top_p row lost its top_p. The engine takes its inbox only once
    every request of a run is in it, so the whole run is one batch from its first step."""
    row = {"prompt": "Prompt number 1 word word word word word word word ", "max_tokens": 30, "temperature": 0.9,
           "seed": 101, "top_k": 20, "top_p": 0.95}
    neighbours = [{"prompt": f"Prompt number {i} word word word word word word word ", "max_tokens": 30,
                   "temperature": 0.9, "seed": 101 + i, "top_p": 0.95} for i in (2, 3, 4)]
    engine = server.engine
    take_inbox = engine._take_inbox
    expected = 0

    def take_when_all_arrived() -> None:
        if engine.num_unfinished >= expected:
            take_inbox()

    monkeypatch.setattr(engine, "_take_inbox", take_when_all_arrived)

    async def run(bodies: list[dict[str, Any]]) -> list[str]:
        nonlocal expected
        expected = len(bodies)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            responses = await asyncio.gather(*(client.post(C, json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        return [r.json()["choices"][0]["text"] for r in responses]

    [alone] = asyncio.run(run([row]))
    assert asyncio.run(run([row, *neighbours]))[0] == alone
    assert asyncio.run(run([*neighbours[:2], row]))[2] == alone
    [top_k_only] = asyncio.run(run([{k: v for k, v in row.items() if k != "top_p"}]))
    assert top_k_only != alone  # the row's top_p matters to its draw
