"""The playground's routing views in chromium, against a live tiny server started with
--enable-return-routed-experts: a hovered (or focused) token's layers x experts grid is the API's routing of that
token, and the answer's routing view counts the API's rows.

NOTE: these need the routed-experts API (issue 29 item 1, branch `routed`); until it is merged build_engine takes
no enable_return_routed_experts and they skip, saying so.
"""

import inspect
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.startup import build_engine
from tests.server.live import TINY_SERVE, LiveServer, live_server
from tests.server.playground.browser import PageWatch, expect, fill, non_streamed, routed_rows

pytestmark = pytest.mark.skipif(
    "enable_return_routed_experts" not in inspect.signature(build_engine).parameters,
    reason="needs the routed-experts API (issue 29 item 1, branch routed), not merged here yet")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Any:
    with live_server(tiny_checkpoint, enable_return_routed_experts=True) as live:
        yield live


def grid_of(tooltip: Any) -> list[list[int]]:
    """The tooltip grid's experts of each layer, in rank order."""
    cells = tooltip.locator("td.cell[data-rank]").evaluate_all(
        "cells => cells.map(c => [+c.dataset.layer, +c.dataset.rank, +c.dataset.expert])")
    layers: dict[int, list[tuple[int, int]]] = {}
    for layer, rank, expert in cells:
        layers.setdefault(layer, []).append((rank, expert))
    return [[expert for _, expert in sorted(layers[layer])] for layer in sorted(layers)]


def test_a_tokens_grid_shows_the_experts_the_api_routed_it_to(page: tuple[Any, PageWatch], server: LiveServer,
                                                             http: httpx.Client, screenshots: Path) -> None:
    page, watch = page
    fill(page, seed=13, max_tokens=8)
    page.fill("#chat-input", "Which experts?")
    page.click("#chat-send")
    answer = page.locator(".turn.assistant .answer")
    expect(answer).to_have_attribute("data-state", "done")
    (body,) = watch.bodies(CHAT)  # one request: the server returned the routing it asked for
    assert body["return_routed_experts"] is True
    expect(page.locator("#routing-status")).to_have_attribute("data-routing", "on")
    reference = http.post(CHAT, json=non_streamed(body)).json()
    (choice,) = reference["choices"]
    num_prompt, num_tokens = reference["usage"]["prompt_tokens"], reference["usage"]["completion_tokens"]
    rows = routed_rows(choice["routed_experts"])
    assert rows.shape == (num_prompt + num_tokens - 1, TINY_SERVE.num_hidden_layers, TINY_SERVE.top_k_experts)
    assert answer.text_content() == choice["message"]["content"]
    tooltip = page.locator("#tooltip")
    spans = answer.locator(".tok")
    for i in (0, num_tokens // 2, num_tokens - 2):
        spans.nth(i).hover()
        expect(tooltip.locator(".logprob")).to_have_text(f"{choice['logprobs']['content'][i]['logprob']:.4f}")
        # Token i's own routing is row prompt_tokens + i.
        assert grid_of(tooltip) == rows[num_prompt + i].tolist()
        # One column per expert of the model.
        expect(tooltip.locator("tbody tr").first.locator("td.cell")).to_have_count(TINY_SERVE.num_routed_experts)
        if i == num_tokens // 2:
            page.screenshot(path=screenshots / "token-routing.png")
    spans.nth(num_tokens - 1).hover()
    expect(tooltip.locator(".routing-note")).to_contain_text("never read this token")
    # Keyboard users get the same grid.
    page.mouse.move(0, 0)
    spans.nth(1).focus()
    expect(tooltip.locator(".logprob")).to_have_text(f"{choice['logprobs']['content'][1]['logprob']:.4f}")
    assert grid_of(tooltip) == rows[num_prompt + 1].tolist()
    assert watch.errors == []


def test_the_routing_view_counts_the_answers_tokens_per_expert(page: tuple[Any, PageWatch], http: httpx.Client,
                                                              screenshots: Path) -> None:
    page, watch = page
    page.click("#tab-completion")
    fill(page, seed=17, max_tokens=12)
    page.fill("#prompt", "Routing, layer by layer:")
    page.click("#completion-generate")
    expect(page.locator("#completion-output .answer")).to_have_attribute("data-state", "done")
    body = watch.bodies(COMPLETIONS)[-1]
    reference = http.post(COMPLETIONS, json=non_streamed(body)).json()
    rows = routed_rows(reference["choices"][0]["routed_experts"])
    num_prompt = reference["usage"]["prompt_tokens"]
    expected = np.zeros((TINY_SERVE.num_hidden_layers, TINY_SERVE.num_routed_experts), dtype=int)
    for row in rows[num_prompt:]:  # the generated tokens the model read: all but the last
        for layer, experts in enumerate(row):
            np.add.at(expected[layer], experts, 1)
    cells = page.locator("#answer-routing td.cell").evaluate_all(
        "cells => cells.map(c => [+c.dataset.layer, +c.dataset.expert, +c.dataset.count])")
    shown = np.zeros_like(expected)
    for layer, expert, count in cells:
        shown[layer, expert] = count
    assert len(cells) == expected.size and (shown == expected).all()
    assert expected.sum() == (len(rows) - num_prompt) * TINY_SERVE.num_hidden_layers * TINY_SERVE.top_k_experts
    expect(page.locator("#answer-routing caption")).to_contain_text(f"{len(rows) - num_prompt} tokens")
    assert watch.errors == []
    page.screenshot(path=screenshots / "routing.png")
