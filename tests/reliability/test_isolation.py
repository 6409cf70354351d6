"""Isolation between requests: concurrent requests never see each other's text, however their cache blocks are
freed and reused, and a block written by one request is read by another only through a verified prefix-cache
match (same tokens, same parent chain), never through a bare hash hit."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine import block_manager as block_manager_module
from tests.server.live import LiveServer, live_server

MAX_TOKENS = 24
NUM_PROMPTS = 8
# Small enough that 8 concurrent requests do not fit: blocks are freed, reused and sequences preempted.
SMALL_CACHE = dict(kv_cache_tokens="256", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=128)


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Distinct first tokens: no two prompts share even their first block.
    return [[1000 + i] + [rng.randrange(2, 49152) for _ in range(rng.randint(32, 70))] for i in range(count)]


def _body(prompt: list[int], **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0} | extra


def _tokens(choice: dict[str, Any]) -> list[str]:
    return list(choice["logprobs"]["tokens"])


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    """Each request alone, on a server without prefix caching and with room to spare: the expected outputs."""
    with live_server(tiny_checkpoint, enable_prefix_caching=False) as live:
        yield live


def _solo(oracle: LiveServer, prompts: list[list[int]]) -> list[tuple[str, list[str]]]:
    out = []
    with oracle.client() as client:
        for p in prompts:
            choice = client.post("/v1/completions", json=_body(p)).json()["choices"][0]
            out.append((choice["text"], _tokens(choice)))
    return out


async def _run_streaming(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, list[str]]:
    text, tokens = "", []
    async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["text"]
                    tokens += choice["logprobs"]["tokens"] if choice["logprobs"] else []
    return text, tokens


async def _run_plain(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, list[str]]:
    reply = await client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["text"], _tokens(choice)


async def _abandon(client: httpx.AsyncClient, prompt: list[int], after_chunks: int) -> None:
    """A client that goes away mid-stream: its blocks are freed while the others run."""
    body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        seen = 0
        async for line in reply.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= after_chunks:
                return


async def _round(base_url: str, prompts: list[list[int]], seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        async def measured(i: int) -> tuple[int, tuple[str, list[str]]]:
            await asyncio.sleep(rng.uniform(0, 0.3))  # staggered: different batch mixes every round
            run = _run_streaming if rng.random() < 0.5 else _run_plain
            return i, await run(client, _body(prompts[i]))

        noise = _prompts(seed + 1000, 6)
        tasks = [measured(i) for i in order] + [_abandon(client, p, rng.randint(1, 4)) for p in noise]
        results = await asyncio.gather(*tasks)
    by_index = dict(r for r in results if r is not None)
    return [by_index[i] for i in range(len(prompts))]


def test_concurrent_requests_with_aborts_give_their_solo_outputs(tiny_checkpoint: Path, oracle: LiveServer) -> None:
    prompts = _prompts(1, NUM_PROMPTS)
    solo = _solo(oracle, prompts)
    assert len({text for text, _ in solo}) == NUM_PROMPTS  # distinct outputs, so a mix-up would show
    with live_server(tiny_checkpoint, **SMALL_CACHE) as server:
        for round_seed in range(3):
            outputs = asyncio.run(_round(server.base_url, prompts, round_seed))
            for i, (got, want) in enumerate(zip(outputs, solo, strict=True)):
                assert got == want, f"round {round_seed}, prompt {i}: {got[0]!r} != solo {want[0]!r}"
        # Blocks really were recycled: one round's measured requests alone need more tokens than the cache holds.
        capacity = server.engine.scheduler.block_manager.num_total_blocks * server.engine.config.block_size
        assert capacity < sum(len(p) + MAX_TOKENS for p in prompts)
        assert server.engine.scheduler.num_preemptions > 0  # and sequences were evicted and recomputed
        _wait_idle(server)


def _wait_idle(server: LiveServer) -> None:
    deadline = time.monotonic() + 10
    while server.engine.num_unfinished or server.engine.scheduler.block_manager.usage:
        assert time.monotonic() < deadline, "engine not idle"
        time.sleep(0.01)
    server.engine.scheduler.block_manager.check_invariants()


def _hits(server: LiveServer, prompt: list[int]) -> tuple[int, tuple[str, list[str]]]:
    """Prefix-cache hit tokens of one request (run alone), and its output."""
    sched = server.engine.scheduler
    before = sched.num_prefix_hit_tokens
    with server.client() as client:
        choice = client.post("/v1/completions", json=_body(prompt)).json()["choices"][0]
    return sched.num_prefix_hit_tokens - before, (choice["text"], _tokens(choice))


def test_blocks_are_shared_only_through_verified_prefix_matches(tiny_checkpoint: Path, oracle: LiveServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    prefix = [2000] + [rng.randrange(2, 49152) for _ in range(63)]  # exactly 4 full blocks of 16
    shared_a = prefix + [rng.randrange(2, 49152) for _ in range(9)]
    shared_b = prefix + [rng.randrange(2, 49152) for _ in range(12)]
    unrelated = [2001, *prefix[1:], *shared_b[64:]]  # same tokens but the first: every block's chain differs
    collide = [2002] + [rng.randrange(2, 49152) for _ in range(50)]
    expected = dict(zip(("a", "b", "u", "c"), _solo(oracle, [shared_a, shared_b, unrelated, collide]), strict=True))

    with live_server(tiny_checkpoint, **SMALL_CACHE) as server:
        hits, out = _hits(server, shared_a)
        assert hits == 0 and out == expected["a"]
        hits, out = _hits(server, shared_b)
        assert hits == 64 and out == expected["b"]  # the 4 prefix blocks, read from shared_a's cache
        hits, out = _hits(server, unrelated)
        assert hits == 0 and out == expected["u"]  # same later tokens, different parent chain: no reuse

        # Every block now hashes alike: a lookup finds a hash match for any prompt, and only the content and
        # parent check stands between a request and another request's KV.
        monkeypatch.setattr(block_manager_module, "compute_block_hash", lambda prev, tokens: 12345)
        hits, out = _hits(server, collide)
        assert hits == 0 and out == expected["c"]
        hits, out = _hits(server, shared_b)
        assert out == expected["b"]
        _wait_idle(server)

